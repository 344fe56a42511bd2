//! The jobs of one `serve`, controlled: each job's task on the island, started, paused, resumed,
//! cancelled and stopped through a [`Signal`], and its status — this gateway's view beside the
//! progress every gateway shares in the job's tables. Behind the `Jobs` gRPC service
//! ([`JobsService`]), the `every` schedules and the stream jobs `serve` starts.
//!
//! Threads: the control is shared by every core's gRPC service; each call's work runs on the
//! island (the driver and the jobs are tokio-bound) and the core awaits its join handle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use scylla::client::session::Session;
use tokio::sync::watch;

pub use super::signal::{next_command, steady, Command, Interrupted, Signal};
use super::tap::Rollup;
use crate::auth::{check, check_caller, Access, Caller};
use crate::client::GatewayAddr;
use crate::config::{ClusterConfig, JobConfig, RouteConfig};
use crate::server::gate::forbidden;
use crate::telemetry::metric;
use crate::wire::proto::jobs_server::Jobs;
use crate::wire::proto::{JobRequest, JobStatus, ListJobsRequest, ListJobsResponse};

/// A job's state on this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    Idle,
    Running,
    Paused,
    Done,
    Failed,
    Cancelled,
}

impl Local {
    fn as_str(self) -> &'static str {
        match self {
            Local::Idle => "idle",
            Local::Running => "running",
            Local::Paused => "paused",
            Local::Done => "done",
            Local::Failed => "failed",
            Local::Cancelled => "cancelled",
        }
    }

    fn active(self) -> bool {
        matches!(self, Local::Running | Local::Paused)
    }
}

/// One job's control channel and local state (with its last failure).
struct Entry {
    job: JobConfig,
    command: watch::Sender<Command>,
    local: watch::Sender<(Local, String)>,
    /// The summary of this gateway's last task of the job.
    report: std::sync::Mutex<String>,
}

/// The gateway's jobs.
pub struct JobControl {
    island: tokio::runtime::Handle,
    cluster: ClusterConfig,
    routes: Vec<RouteConfig>,
    endpoint: GatewayAddr,
    session: Arc<Session>,
    /// The stream jobs' rollups, folding on the cores (`super::tap`), by job name.
    rollups: HashMap<String, Arc<Rollup>>,
    /// In config order.
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

/// A refusal of a control call: NOT_FOUND or FAILED_PRECONDITION, with the reason.
#[derive(Debug)]
pub enum Refused {
    /// No such job.
    Unknown(String),
    /// Not in a state the call applies to.
    State(String),
    /// The job's tables could not be read or written.
    Unavailable(String),
}

impl From<Refused> for tonic::Status {
    fn from(refused: Refused) -> tonic::Status {
        match refused {
            Refused::Unknown(reason) => tonic::Status::not_found(reason),
            Refused::State(reason) => tonic::Status::failed_precondition(reason),
            Refused::Unavailable(reason) => tonic::Status::unavailable(reason),
        }
    }
}

impl JobControl {
    /// The control of `jobs`, running them on `island` through the gateway's listener at
    /// `endpoint`; `session` reads their shared progress.
    pub fn new(
        island: tokio::runtime::Handle,
        cluster: ClusterConfig,
        routes: Vec<RouteConfig>,
        jobs: Vec<JobConfig>,
        endpoint: GatewayAddr,
        session: Arc<Session>,
        rollups: Vec<Arc<Rollup>>,
    ) -> Arc<JobControl> {
        let rollups = rollups
            .into_iter()
            .map(|rollup| (rollup.name().to_string(), rollup))
            .collect();
        let by_name = jobs.iter().enumerate().map(|(i, job)| (job.name.clone(), i)).collect();
        let entries = jobs
            .into_iter()
            .map(|job| Entry {
                job,
                command: watch::channel(Command::Run).0,
                local: watch::channel((Local::Idle, String::new())).0,
                report: std::sync::Mutex::default(),
            })
            .collect();
        Arc::new(JobControl {
            island,
            cluster,
            routes,
            endpoint,
            session,
            rollups,
            entries,
            by_name,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry, Refused> {
        self.by_name.get(name).map(|&i| &self.entries[i]).ok_or_else(|| {
            let names: Vec<&str> = self.entries.iter().map(|e| e.job.name.as_str()).collect();
            Refused::Unknown(format!("no job `{name}`; jobs: {}", names.join(", ")))
        })
    }

    /// Starts every stream job and every `every` schedule (at `serve`'s start).
    pub fn start_all(self: &Arc<Self>) {
        for entry in &self.entries {
            if !entry.job.stream.is_empty() {
                tracing::info!(job = %entry.job.name, routes = ?entry.job.stream, "stream job running");
                let _ = self.start(&entry.job.name);
            } else if let Some(every) = entry.job.every {
                tracing::info!(job = %entry.job.name, every = ?every, "job scheduled");
                self.island
                    .spawn(Arc::clone(self).schedule(entry.job.name.clone(), every));
            }
        }
    }

    /// Runs `name` now, then each `every` after its run ended (a run started over the API
    /// counts), until the gateway stops.
    async fn schedule(self: Arc<Self>, name: String, every: Duration) {
        let Ok(entry) = self.entry(&name) else {
            return;
        };
        let mut local = entry.local.subscribe();
        loop {
            if *entry.command.borrow() == Command::Stop {
                return;
            }
            let _ = self.start(&name);
            // Until it is no longer running or paused here.
            while local.borrow_and_update().0.active() {
                if local.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Starts `name` on the island unless it runs here already.
    pub fn start(self: &Arc<Self>, name: &str) -> Result<(), Refused> {
        let entry = self.entry(name)?;
        if *entry.command.borrow() == Command::Stop {
            return Err(Refused::State(format!("job `{name}`: the gateway is stopping")));
        }
        let mut started = false;
        entry.local.send_if_modified(|(local, error)| {
            if local.active() {
                return false;
            }
            *local = Local::Running;
            error.clear();
            started = true;
            true
        });
        if !started {
            return Ok(());
        }
        entry.command.send_replace(Command::Run);
        let signal = entry.command.subscribe();
        let control = Arc::clone(self);
        let name = name.to_string();
        self.island.spawn(async move { control.run(name, signal).await });
        Ok(())
    }

    /// One task of a job: a scan job's run to its end, or a stream job until cancelled.
    async fn run(self: Arc<Self>, name: String, signal: Signal) {
        let Ok(entry) = self.entry(&name) else {
            return;
        };
        let job = entry.job.clone();
        let outcome = match (&job.replay, job.stream.is_empty(), self.rollups.get(&name)) {
            (Some(route), _, _) => match self.routes.iter().find(|r| &r.name == route) {
                Some(route) => super::replay::replay(Arc::clone(&self.session), route, &name, signal, None)
                    .await
                    .map(|report| report.to_string()),
                None => Err(anyhow::anyhow!("no route `{route}` in the config")),
            },
            (None, true, _) => super::run(&self.cluster, job, &self.endpoint, false, signal)
                .await
                .map(|report| report.to_string()),
            (None, false, Some(rollup)) => Box::pin(super::tap::run(
                Arc::clone(rollup),
                Arc::clone(&self.session),
                &self.endpoint,
                &self.stream_routes(&job),
                signal,
            ))
            .await
            .map(|report| report.to_string()),
            (None, false, None) => {
                let routes = self.stream_routes(&job);
                Box::pin(super::stream::run(&self.cluster, job, &routes, &self.endpoint, signal))
                    .await
                    .map(|report| report.to_string())
            }
        };
        let report = match &outcome {
            Ok(report) => report.clone(),
            // An interrupted run says what it did before it ended.
            Err(error) if error.downcast_ref::<Interrupted>().is_some() => error.to_string(),
            Err(_) => String::new(),
        };
        tracing::info!(job = %name, kind = entry.job.kind(), %report, "job task ended");
        *entry.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = report;
        let (local, error) = match outcome {
            Ok(_) if *entry.command.borrow() == Command::Cancel => (Local::Cancelled, String::new()),
            Ok(_) => (Local::Done, String::new()),
            Err(error) if error.downcast_ref::<Interrupted>().is_some() => (Local::Cancelled, String::new()),
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(job = %name, %error, "job failed");
                (Local::Failed, error)
            }
        };
        if entry.job.stream.is_empty() {
            let outcome = match local {
                Local::Done => "done",
                Local::Cancelled => "cancelled",
                _ => "failed",
            };
            metrics::counter!(metric::JOB_RUNS, "job" => name.clone(), "outcome" => outcome).increment(1);
        }
        entry.local.send_replace((local, error));
    }

    /// The routes stream job `job` folds, in its order.
    fn stream_routes(&self, job: &JobConfig) -> Vec<RouteConfig> {
        job.stream
            .iter()
            .filter_map(|route| self.routes.iter().find(|r| &r.name == route).cloned())
            .collect()
    }

    /// Pauses, resumes or cancels `name` here.
    pub fn command(&self, name: &str, command: Command) -> Result<(), Refused> {
        let entry = self.entry(name)?;
        let (local, _) = entry.local.borrow().clone();
        let next = match (command, local) {
            (Command::Pause, Local::Running) => Local::Paused,
            (Command::Run, Local::Paused) => Local::Running,
            (Command::Cancel, Local::Running | Local::Paused) => local,
            (Command::Stop, _) => local,
            _ => {
                return Err(Refused::State(format!(
                    "job `{name}` is {} here: {}",
                    local.as_str(),
                    match command {
                        Command::Pause => "only a running job pauses",
                        Command::Run => "only a paused job resumes",
                        _ => "only a running or paused job is cancelled",
                    }
                )))
            }
        };
        entry.command.send_replace(command);
        if next != local {
            entry.local.send_replace((next, String::new()));
        }
        Ok(())
    }

    /// Pauses (`Command::Pause`) or resumes (`Command::Run`) `name`. A stream or replay job
    /// pauses here ([`JobControl::command`]). A scan or query job pauses as a run: its run is
    /// marked `paused` (or `running` again) in `job_runs`, and every runner of it — this
    /// gateway's, other gateways', `shardgate job run` processes — claims no new split until it
    /// is resumed; refused unless the run is running (or paused) now.
    pub async fn pause_or_resume(&self, name: &str, command: Command) -> Result<(), Refused> {
        let entry = self.entry(name)?;
        let job = &entry.job;
        if !matches!(job.kind(), "scan" | "query") {
            return self.command(name, command);
        }
        let (change, why) = match command {
            Command::Pause => (("running", "paused"), "only a running job pauses"),
            _ => (("paused", "running"), "only a paused job resumes"),
        };
        let (local, _) = entry.local.borrow().clone();
        let unavailable = |error: anyhow::Error| Refused::Unavailable(format!("job `{name}`: {error:#}"));
        let current = self.current_run(job).await?;
        let shown = shown_state(local, current.as_ref().map(|(_, state)| state.as_str()));
        match current {
            Some((run, state)) if state == change.0 => {
                super::set_run_state(&self.session, &job.state_keyspace, name, run, change)
                    .await
                    .map_err(unavailable)?;
            }
            // Paused here before its run was written: the runner marks it once it is.
            _ if local.active() && shown == change.0 => {}
            _ => {
                let run = match &current {
                    Some((_, state)) => format!("its run is {state}"),
                    None => "it has no run".to_string(),
                };
                return Err(Refused::State(format!("job `{name}` is {shown} here and {run}: {why}")));
            }
        }
        if local.active() {
            entry.command.send_replace(command);
            let next = if command == Command::Pause {
                Local::Paused
            } else {
                Local::Running
            };
            entry.local.send_if_modified(|(local, _)| {
                let changed = local.active() && *local != next;
                if changed {
                    *local = next;
                }
                changed
            });
        }
        Ok(())
    }

    /// Cancels `name`: here when it runs or is paused here ([`JobControl::command`]); else, for
    /// a scan or query job, the run that runs elsewhere (another gateway, `shardgate job run`)
    /// is marked `cancelled` in its table, and every runner of it stops before its next claim.
    pub async fn cancel(&self, name: &str) -> Result<(), Refused> {
        let entry = self.entry(name)?;
        let (local, _) = entry.local.borrow().clone();
        let job = &entry.job;
        if local.active() || !matches!(job.kind(), "scan" | "query") {
            return self.command(name, Command::Cancel);
        }
        let unavailable = |error: anyhow::Error| Refused::Unavailable(format!("job `{name}`: {error:#}"));
        match self.current_run(job).await? {
            Some((run, state)) if state == "running" || state == "paused" => super::cancel_run(&self.session, &job.state_keyspace, name, run)
                .await
                .map_err(unavailable),
            _ => Err(Refused::State(format!(
                "job `{name}` is {} here and no run of it is running elsewhere: only a running or paused job is cancelled",
                local.as_str()
            ))),
        }
    }

    /// `job`'s current run and its state, read from its `job_runs` (`UNAVAILABLE` when it cannot
    /// be read).
    async fn current_run(&self, job: &JobConfig) -> Result<Option<(i64, String)>, Refused> {
        super::current_run_state(&self.session, &job.state_keyspace, &job.name)
            .await
            .map_err(|error| Refused::Unavailable(format!("job `{}`: {error:#}", job.name)))
    }

    /// Tells every job the gateway stops and waits up to `deadline` for their tasks to end
    /// (stream jobs checkpoint first).
    pub async fn stop_all(&self, deadline: Duration) {
        for entry in &self.entries {
            entry.command.send_replace(Command::Stop);
        }
        let waits = self.entries.iter().map(|entry| {
            let mut local = entry.local.subscribe();
            async move {
                while local.borrow_and_update().0.active() {
                    if local.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        if tokio::time::timeout(deadline, futures::future::join_all(waits))
            .await
            .is_err()
        {
            tracing::warn!("jobs did not stop within the shutdown deadline; scan runs resume, stream jobs restart from their last checkpoint");
        }
    }

    /// `name`'s status: this gateway's state and the shared progress in the job's tables.
    pub async fn status(&self, name: &str) -> Result<JobStatus, Refused> {
        let entry = self.entry(name)?;
        let job = &entry.job;
        let (local, error) = entry.local.borrow().clone();
        let mut status = JobStatus {
            job: job.name.clone(),
            kind: job.kind().into(),
            report: entry
                .report
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            state: local.as_str().into(),
            error,
            every: job
                .every
                .map(|every| format!("{}s", every.as_secs()))
                .unwrap_or_default(),
            ..Default::default()
        };
        // Progress tables that do not exist yet (the job never ran) leave the counts at zero.
        let shared = match job.kind() {
            "stream" => stream_progress(&self.session, job, &mut status).await,
            // A replay's progress is its dead-letter destination's (consumer group, rows left).
            "replay" => Ok(()),
            _ => scan_progress(&self.session, job, &mut status)
                .await
                .map(|()| status.state = shown_state(local, Some(&status.run_state)).into()),
        };
        if let Err(error) = shared {
            tracing::debug!(job = %job.name, error = %format!("{error:#}"), "no shared progress");
        }
        Ok(status)
    }

    /// Every job's status, in config order.
    pub async fn list(&self) -> Vec<JobStatus> {
        let mut all = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            if let Ok(status) = self.status(&entry.job.name).await {
                all.push(status);
            }
        }
        all
    }

    /// Whether `name` runs or is paused here.
    fn active(&self, name: &str) -> bool {
        self.entry(name).is_ok_and(|entry| entry.local.borrow().0.active())
    }
}

/// What `state` shows of a scan or query job: this gateway's, except that one running or paused
/// here shows whether its run is paused (any runner's or gateway's control pauses and resumes it).
fn shown_state(local: Local, run: Option<&str>) -> &'static str {
    match (local.active(), run) {
        (true, Some("paused")) => "paused",
        (true, Some("running")) => "running",
        _ => local.as_str(),
    }
}

/// A scan job's current run: its state, splits done of all, rows read by the done ones.
async fn scan_progress(session: &Session, job: &JobConfig, status: &mut JobStatus) -> anyhow::Result<()> {
    let keyspace = &job.state_keyspace;
    let run = session
        .query_unpaged(
            format!("SELECT run, state, splits FROM {keyspace}.job_runs WHERE job = ?"),
            (&job.name,),
        )
        .await?
        .into_rows_result()?
        .maybe_first_row::<(i64, Option<String>, Option<i32>)>()?;
    let Some((run, state, splits)) = run else {
        return Ok(());
    };
    status.run = run;
    status.run_state = state.unwrap_or_default();
    status.splits_total = splits.unwrap_or_default().max(0) as u32;
    type Split = (Option<bool>, Option<i64>, Option<String>, Option<i64>);
    let splits: Vec<Split> = session
        .query_iter(
            format!("SELECT done, rows_in, owner, lease_until FROM {keyspace}.job_splits WHERE job = ? AND run = ?"),
            (&job.name, run),
        )
        .await?
        .rows_stream::<Split>()?
        .try_collect()
        .await?;
    let now = super::now_ms();
    let mut runners = std::collections::BTreeSet::new();
    for (done, rows, owner, lease_until) in splits {
        if done == Some(true) {
            status.splits_done += 1;
            status.rows_read += rows.unwrap_or_default().max(0) as u64;
        } else if let (Some(owner), Some(until)) = (owner, lease_until) {
            if until > now && !owner.is_empty() {
                runners.insert(owner);
            }
        }
    }
    status.runners = runners.into_iter().collect();
    Ok(())
}

/// A stream job's messages checkpointed and its closed mark.
async fn stream_progress(session: &Session, job: &JobConfig, status: &mut JobStatus) -> anyhow::Result<()> {
    let progress = super::stream::progress(session, &job.state_keyspace, &job.name).await?;
    status.rows_read = progress.messages;
    status.closed_through_ms = progress.closed_through_ms.unwrap_or_default();
    Ok(())
}

/// The `Jobs` gRPC service of one core: each call runs on the island.
pub struct JobsService {
    control: Arc<JobControl>,
}

impl JobsService {
    /// A core's service over the gateway's job control.
    pub fn new(control: Arc<JobControl>) -> JobsService {
        JobsService { control }
    }

    /// Runs `work` on the island and awaits it here.
    async fn on_island<T, F>(&self, work: impl FnOnce(Arc<JobControl>) -> F) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<T, Refused>> + Send + 'static,
        T: Send + 'static,
    {
        let future = work(Arc::clone(&self.control));
        self.control
            .island
            .spawn(future)
            .await
            .map_err(|e| tonic::Status::internal(format!("job control task: {e}")))?
            .map_err(tonic::Status::from)
    }

    async fn act(
        &self,
        request: JobRequest,
        command: Option<Command>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        let status = self
            .on_island(move |control| async move {
                match command {
                    None => control.start(&request.job)?,
                    Some(Command::Cancel) => control.cancel(&request.job).await?,
                    Some(command) => control.pause_or_resume(&request.job, command).await?,
                }
                control.status(&request.job).await
            })
            .await?;
        Ok(tonic::Response::new(status))
    }
}

/// The request, when its caller may watch and control its job (`jobs:<job>`).
fn permitted(request: tonic::Request<JobRequest>) -> Result<JobRequest, tonic::Status> {
    check(request.extensions(), Access::Job(&request.get_ref().job)).map_err(forbidden)?;
    Ok(request.into_inner())
}

/// How often `WatchJob` sends a status.
const WATCH_EVERY: Duration = Duration::from_secs(1);

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn list_jobs(
        &self,
        request: tonic::Request<ListJobsRequest>,
    ) -> Result<tonic::Response<ListJobsResponse>, tonic::Status> {
        check(request.extensions(), Access::Authenticated).map_err(forbidden)?;
        let caller = Caller::of(request.extensions());
        let mut jobs = self
            .on_island(|control| async move { Ok(control.list().await) })
            .await?;
        // Only the jobs the caller may see.
        jobs.retain(|job| check_caller(caller.as_ref(), Access::Job(&job.job)).is_ok());
        Ok(tonic::Response::new(ListJobsResponse { jobs }))
    }

    async fn get_job_status(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        let job = permitted(request)?.job;
        let status = self
            .on_island(move |control| async move { control.status(&job).await })
            .await?;
        Ok(tonic::Response::new(status))
    }

    async fn start_job(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        self.act(permitted(request)?, None).await
    }

    async fn pause_job(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        self.act(permitted(request)?, Some(Command::Pause)).await
    }

    async fn resume_job(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        self.act(permitted(request)?, Some(Command::Run)).await
    }

    async fn cancel_job(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<JobStatus>, tonic::Status> {
        self.act(permitted(request)?, Some(Command::Cancel)).await
    }

    type WatchJobStream = futures::stream::BoxStream<'static, Result<JobStatus, tonic::Status>>;

    async fn watch_job(
        &self,
        request: tonic::Request<JobRequest>,
    ) -> Result<tonic::Response<Self::WatchJobStream>, tonic::Status> {
        let job = permitted(request)?.job;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        // Refuse an unknown job at once, not in the stream.
        self.control.entry(&job).map_err(tonic::Status::from)?;
        let control = Arc::clone(&self.control);
        self.control.island.spawn(async move {
            loop {
                let active = control.active(&job);
                let status = control.status(&job).await.map_err(tonic::Status::from);
                if sender.send(status).await.is_err() || !active {
                    return;
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan job running or paused here shows its run's pause (whoever paused or resumed it);
    /// otherwise, or before its run is written, this gateway's own state.
    #[test]
    fn a_scan_job_shows_its_runs_pause() {
        assert_eq!(shown_state(Local::Running, Some("paused")), "paused");
        assert_eq!(shown_state(Local::Paused, Some("running")), "running");
        assert_eq!(
            shown_state(Local::Paused, Some("done")),
            "paused",
            "its run not written yet"
        );
        assert_eq!(shown_state(Local::Idle, Some("paused")), "idle", "paused elsewhere");
        assert_eq!(shown_state(Local::Cancelled, Some("running")), "cancelled");
        assert_eq!(shown_state(Local::Running, None), "running");
    }
}
