//! A job's aggregation: rows folded into groups keyed by their `group_by` values and event-time
//! window, one state per measure; a [`Partial`] per split, merged at the end into result rows.
//! Partials serialize (JSON) into the job's progress table, so the merge can run in any gateway
//! and a restart loses no finished split. Pure.

use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::config::{AggregateConfig, MeasureKind, WindowSpec};
use crate::wire::proto::value::Kind;
use crate::wire::proto::{Row, Value, Values};

/// Fixed HyperLogLog seed: partials from every gateway must hash alike to merge.
const HLL_SEED: u128 = 0x7368_6172_6467_6174_652d_6a6f_622d_686c;
/// Error rate given to the `hyperloglog` crate: 0.004 gives 2^12 registers (4 KiB per group),
/// a standard error of 1.6 %, and counts below ~10,000 nearly exact (linear counting).
const HLL_ERROR: f64 = 0.004;

/// A number or text a measure folds (CEL results, in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text (and anything else, as its JSON text).
    Text(String),
}

impl Scalar {
    fn of(value: &serde_json::Value) -> Option<Scalar> {
        match value {
            serde_json::Value::Null => None,
            serde_json::Value::Number(n) => Some(match n.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Float(n.as_f64().unwrap_or(f64::NAN)),
            }),
            serde_json::Value::String(s) => Some(Scalar::Text(s.clone())),
            other => Some(Scalar::Text(other.to_string())),
        }
    }

    /// Numbers before text; numbers by value, text by bytes.
    fn less(&self, other: &Scalar) -> bool {
        let number = |s: &Scalar| match s {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(f) => Some(*f),
            Scalar::Text(_) => None,
        };
        match (self, other) {
            (Scalar::Int(a), Scalar::Int(b)) => a < b,
            (Scalar::Text(a), Scalar::Text(b)) => a < b,
            (Scalar::Text(_), _) => false,
            (_, Scalar::Text(_)) => true,
            _ => number(self) < number(other),
        }
    }

    fn value(&self) -> Value {
        Value {
            kind: Some(match self {
                Scalar::Int(i) => Kind::Int(*i),
                Scalar::Float(f) => Kind::Double(*f),
                Scalar::Text(s) => Kind::Text(s.clone()),
            }),
        }
    }
}

/// One measure's running state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum State {
    /// Rows counted.
    Count(u64),
    /// Integer sum (exact) until a float arrives, then a double.
    Sum {
        /// Sum of the integers.
        int: i64,
        /// Sum of the floats (and of the integers once `float` is set).
        float: f64,
        /// A float (or an integer overflow) was seen.
        is_float: bool,
    },
    /// Least value so far.
    Min(Option<Scalar>),
    /// Greatest value so far.
    Max(Option<Scalar>),
    /// Sum and count of the numbers.
    Mean {
        /// Sum.
        sum: f64,
        /// Count.
        count: u64,
    },
    /// HyperLogLog of the values' JSON text.
    Distinct(Box<hyperloglog::HyperLogLog>),
    /// The earliest row's value so far: (event time, value).
    First(Option<(i64, Scalar)>),
    /// The latest row's value so far.
    Last(Option<(i64, Scalar)>),
}

/// Whether `(time, value)` comes before `other` (earlier, or as early and less).
fn earlier(candidate: &(i64, Scalar), other: &(i64, Scalar)) -> bool {
    candidate.0 < other.0 || (candidate.0 == other.0 && candidate.1.less(&other.1))
}

impl State {
    fn new(kind: MeasureKind) -> State {
        match kind {
            MeasureKind::Count => State::Count(0),
            MeasureKind::Sum => State::Sum {
                int: 0,
                float: 0.0,
                is_float: false,
            },
            MeasureKind::Min => State::Min(None),
            MeasureKind::Max => State::Max(None),
            MeasureKind::Mean => State::Mean { sum: 0.0, count: 0 },
            MeasureKind::Distinct => State::Distinct(Box::new(hyperloglog::HyperLogLog::new_deterministic(
                HLL_ERROR, HLL_SEED,
            ))),
            MeasureKind::First => State::First(None),
            MeasureKind::Last => State::Last(None),
        }
    }

    /// Keeps `(time, value)` in a `first` or `last` state when it comes before (after) the kept
    /// one — the same choice in whatever order rows and partials arrive.
    fn keep(&mut self, candidate: (i64, Scalar)) {
        match self {
            State::First(kept) if kept.as_ref().is_none_or(|k| earlier(&candidate, k)) => *kept = Some(candidate),
            State::Last(kept) if kept.as_ref().is_none_or(|k| earlier(k, &candidate)) => *kept = Some(candidate),
            _ => {}
        }
    }

    /// Folds one row's value (`None` for `count()`) at event time `time_ms`; a null is skipped
    /// by every measure but `count()`. A value a measure cannot take is an error naming it.
    fn fold(&mut self, value: Option<&serde_json::Value>, time_ms: Option<i64>) -> Result<(), String> {
        let scalar = value.and_then(Scalar::of);
        match self {
            State::First(_) | State::Last(_) => {
                if let (Some(s), Some(time)) = (scalar, time_ms) {
                    self.keep((time, s));
                }
            }
            State::Count(n) => *n += 1,
            State::Sum { int, float, is_float } => match scalar {
                None => {}
                Some(Scalar::Int(i)) => match int.checked_add(i) {
                    Some(sum) if !*is_float => *int = sum,
                    _ => {
                        if !*is_float {
                            *float += *int as f64;
                            *int = 0;
                            *is_float = true;
                        }
                        *float += i as f64;
                    }
                },
                Some(Scalar::Float(f)) => {
                    if !*is_float {
                        *float += *int as f64;
                        *int = 0;
                        *is_float = true;
                    }
                    *float += f;
                }
                Some(Scalar::Text(t)) => return Err(format!("sum of a non-number: {t:?}")),
            },
            State::Min(current) => {
                if let Some(s) = scalar {
                    if current.as_ref().is_none_or(|c| s.less(c)) {
                        *current = Some(s);
                    }
                }
            }
            State::Max(current) => {
                if let Some(s) = scalar {
                    if current.as_ref().is_none_or(|c| c.less(&s)) {
                        *current = Some(s);
                    }
                }
            }
            State::Mean { sum, count } => match scalar {
                None => {}
                Some(Scalar::Int(i)) => {
                    *sum += i as f64;
                    *count += 1;
                }
                Some(Scalar::Float(f)) => {
                    *sum += f;
                    *count += 1;
                }
                Some(Scalar::Text(t)) => return Err(format!("mean of a non-number: {t:?}")),
            },
            State::Distinct(hll) => {
                if let Some(value) = value.filter(|v| !v.is_null()) {
                    hll.insert(&value.to_string());
                }
            }
        }
        Ok(())
    }

    /// Merges another partial's state of the same measure.
    fn merge(&mut self, other: State) {
        match (self, other) {
            (State::Count(a), State::Count(b)) => *a += b,
            (
                State::Sum { int, float, is_float },
                State::Sum {
                    int: other_int,
                    float: other_float,
                    is_float: other_is_float,
                },
            ) => match (*is_float || other_is_float, int.checked_add(other_int)) {
                (false, Some(sum)) => *int = sum,
                _ => {
                    *float += *int as f64 + other_int as f64 + other_float;
                    *int = 0;
                    *is_float = true;
                }
            },
            (State::Min(a), State::Min(Some(b))) if a.as_ref().is_none_or(|c| b.less(c)) => *a = Some(b),
            (State::Max(a), State::Max(Some(b))) if a.as_ref().is_none_or(|c| c.less(&b)) => *a = Some(b),
            (State::Mean { sum, count }, State::Mean { sum: s, count: c }) => {
                *sum += s;
                *count += c;
            }
            (State::Distinct(a), State::Distinct(b)) => a.merge(&b),
            (state @ (State::First(_) | State::Last(_)), State::First(Some(b)) | State::Last(Some(b))) => state.keep(b),
            _ => {}
        }
    }

    /// The result value.
    fn result(&self) -> Value {
        let kind = match self {
            State::Count(n) => Kind::Int(*n as i64),
            State::Sum { int, float, is_float } => {
                if *is_float {
                    Kind::Double(*float)
                } else {
                    Kind::Int(*int)
                }
            }
            State::Min(s) | State::Max(s) => return s.as_ref().map_or_else(null, Scalar::value),
            State::Mean { sum, count } => {
                if *count == 0 {
                    return null();
                }
                Kind::Double(sum / *count as f64)
            }
            State::Distinct(hll) => Kind::Int(hll.len().round() as i64),
            State::First(kept) | State::Last(kept) => return kept.as_ref().map_or_else(null, |(_, s)| s.value()),
        };
        Value { kind: Some(kind) }
    }
}

fn null() -> Value {
    Value {
        kind: Some(Kind::Null(true)),
    }
}

/// One group's window and measure states.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    /// Window start, epoch milliseconds (windowed jobs).
    pub window_ms: Option<i64>,
    /// One state per measure, in measure order.
    pub states: Vec<State>,
}

/// The groups one split (or several, merged) folded, keyed by the group values' encoding and
/// the window, so the results come out in one order wherever they are merged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Partial {
    /// Group key → group.
    pub groups: BTreeMap<String, Group>,
}

/// The windows holding `time_ms`: starts at multiples of `hop` whose window `[start, start +
/// size)` holds it.
pub fn windows_of(time_ms: i64, spec: WindowSpec) -> impl Iterator<Item = i64> {
    let last = time_ms.div_euclid(spec.hop_ms) * spec.hop_ms;
    let count = spec.size_ms / spec.hop_ms;
    (0..count).map(move |i| last - i * spec.hop_ms)
}

impl Partial {
    /// Folds one row: `group` its `group_by` values, `time_ms` its event time (windowed jobs),
    /// `values` each measure's value (`None` for `count()`). Windows ending at or before
    /// `closed_through` are left alone. Returns how many groups took the row (0: every window
    /// of its time is closed).
    pub fn fold(
        &mut self,
        config: &AggregateConfig,
        group: Vec<Value>,
        time_ms: Option<i64>,
        values: &[Option<serde_json::Value>],
        closed_through: i64,
    ) -> Result<usize, String> {
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(Values { values: group }.encode_to_vec());
        let windows: Vec<Option<i64>> = match (&config.window, time_ms) {
            (Some(window), Some(time)) => windows_of(time, window.spec)
                .filter(|start| start.saturating_add(window.spec.size_ms) > closed_through)
                .map(Some)
                .collect(),
            (Some(window), None) => return Err(format!("no event time in `{}`", window.column)),
            (None, _) => vec![None],
        };
        let folded = windows.len();
        for window in windows {
            let key = match window {
                Some(start) => format!("{encoded}@{start}"),
                None => encoded.clone(),
            };
            let group = self.groups.entry(key).or_insert_with(|| Group {
                window_ms: window,
                states: config.measures.iter().map(|m| State::new(m.kind)).collect(),
            });
            for ((state, value), measure) in group.states.iter_mut().zip(values).zip(&config.measures) {
                state
                    .fold(value.as_ref(), time_ms)
                    .map_err(|e| format!("measure `{}`: {e}", measure.name))?;
            }
        }
        Ok(folded)
    }

    /// Splits the groups by window start (`None`: unwindowed), each window's own partial.
    pub fn by_window(&self) -> BTreeMap<Option<i64>, Partial> {
        let mut windows: BTreeMap<Option<i64>, Partial> = BTreeMap::new();
        for (key, group) in &self.groups {
            windows
                .entry(group.window_ms)
                .or_default()
                .groups
                .insert(key.clone(), group.clone());
        }
        windows
    }

    /// Drops the groups of windows ending at or before `closed_through` (`size_ms` long).
    pub fn drop_closed(&mut self, size_ms: i64, closed_through: i64) {
        self.groups.retain(|_, group| {
            group
                .window_ms
                .is_none_or(|start| start.saturating_add(size_ms) > closed_through)
        });
    }

    /// Merges another partial into this one.
    pub fn merge(&mut self, other: Partial) {
        for (key, group) in other.groups {
            match self.groups.get_mut(&key) {
                Some(mine) => {
                    for (state, theirs) in mine.states.iter_mut().zip(group.states) {
                        state.merge(theirs);
                    }
                }
                None => {
                    self.groups.insert(key, group);
                }
            }
        }
    }

    /// The result rows: the group values, `window_start` when windowed, then each measure.
    pub fn rows(&self) -> Vec<Row> {
        self.keyed_rows().into_iter().map(|(_, row)| row).collect()
    }

    /// The result rows, each with its group's key (stable across runs and gateways: the
    /// encoded group values and the window start).
    pub fn keyed_rows(&self) -> Vec<(String, Row)> {
        self.groups
            .iter()
            .map(|(key, group)| {
                let encoded = key.split('@').next().unwrap_or_default();
                let mut values = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(encoded)
                    .ok()
                    .and_then(|bytes| Values::decode(bytes.as_slice()).ok())
                    .map(|v| v.values)
                    .unwrap_or_default();
                if let Some(start) = group.window_ms {
                    values.push(Value {
                        kind: Some(Kind::TimestampMs(start)),
                    });
                }
                values.extend(group.states.iter().map(State::result));
                (key.clone(), Row { values })
            })
            .collect()
    }
}

/// The result columns of `config`, in [`Partial::rows`] order.
pub fn result_columns(config: &AggregateConfig) -> Vec<String> {
    let mut columns = config.group_by.clone();
    if config.window.is_some() {
        columns.push("window_start".into());
    }
    columns.extend(config.measures.iter().map(|m| m.name.clone()));
    columns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MeasureConfig, WindowConfig};
    use serde_json::json;

    fn config(window: Option<WindowSpec>) -> AggregateConfig {
        let measure = |name: &str, kind| MeasureConfig {
            name: name.into(),
            kind,
            expr: Some("row.x".into()),
        };
        AggregateConfig {
            group_by: vec!["g".into()],
            window: window.map(|spec| WindowConfig {
                column: "at".into(),
                lateness_ms: 0,
                spec,
            }),
            measures: vec![
                measure("n", MeasureKind::Count),
                measure("total", MeasureKind::Sum),
                measure("least", MeasureKind::Min),
                measure("most", MeasureKind::Max),
                measure("avg", MeasureKind::Mean),
                measure("kinds", MeasureKind::Distinct),
            ],
        }
    }

    fn int(i: i64) -> Value {
        Value {
            kind: Some(Kind::Int(i)),
        }
    }

    fn fold(partial: &mut Partial, config: &AggregateConfig, g: i64, time: Option<i64>, x: serde_json::Value) {
        let values = vec![
            None,
            Some(x.clone()),
            Some(x.clone()),
            Some(x.clone()),
            Some(x.clone()),
            Some(x),
        ];
        partial
            .fold(config, vec![int(g)], time, &values, i64::MIN)
            .expect("fold");
    }

    #[test]
    fn partials_merged_equal_one_fold_of_all_rows() {
        let config = config(None);
        let (mut whole, mut a, mut b) = (Partial::default(), Partial::default(), Partial::default());
        for i in 0..1000i64 {
            let x = serde_json::json!(i % 37);
            fold(&mut whole, &config, i % 3, None, x.clone());
            fold(if i % 2 == 0 { &mut a } else { &mut b }, &config, i % 3, None, x);
        }
        // Through JSON, as partials travel through the progress table.
        let a: Partial = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let b: Partial = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let mut merged = a;
        merged.merge(b);
        assert_eq!(merged.rows(), whole.rows());
        // Group 0: the rows i ≡ 0 (mod 3).
        let group: Vec<i64> = (0..1000).filter(|i| i % 3 == 0).map(|i| i % 37).collect();
        let row = &whole.rows()[0];
        assert_eq!(row.values[0], int(0));
        assert_eq!(row.values[1], int(group.len() as i64));
        assert_eq!(row.values[2], int(group.iter().sum()));
        assert_eq!(row.values[3], int(*group.iter().min().unwrap()));
        assert_eq!(row.values[4], int(*group.iter().max().unwrap()));
        let mean = group.iter().sum::<i64>() as f64 / group.len() as f64;
        assert_eq!(row.values[5].kind, Some(Kind::Double(mean)));
        let Some(Kind::Int(distinct)) = row.values[6].kind else {
            panic!("distinct is an int");
        };
        assert!(
            (36..=38).contains(&distinct),
            "37 distinct values, estimated {distinct}"
        );
    }

    #[test]
    fn a_float_turns_a_sum_into_a_double_and_text_is_refused() {
        let config = config(None);
        let mut partial = Partial::default();
        fold(&mut partial, &config, 1, None, serde_json::json!(2));
        fold(&mut partial, &config, 1, None, serde_json::json!(0.5));
        assert_eq!(partial.rows()[0].values[2].kind, Some(Kind::Double(2.5)));
        let values = vec![None, Some(serde_json::json!("x")), None, None, None, None];
        let error = partial
            .fold(&config, vec![int(1)], None, &values, i64::MIN)
            .unwrap_err();
        assert!(error.contains("measure `total`"), "{error}");
    }

    #[test]
    fn hopping_windows_count_a_row_in_each_window_holding_it() {
        let spec = WindowSpec {
            size_ms: 3_600_000,
            hop_ms: 900_000,
        };
        let starts: Vec<i64> = windows_of(3_700_000, spec).collect();
        assert_eq!(starts, [3_600_000, 2_700_000, 1_800_000, 900_000]);
        assert!(starts.iter().all(|s| (*s..s + spec.size_ms).contains(&3_700_000)));
        let tumbling = WindowSpec {
            size_ms: 60_000,
            hop_ms: 60_000,
        };
        assert_eq!(windows_of(-1, tumbling).collect::<Vec<_>>(), [-60_000]);
        let config = config(Some(spec));
        let mut partial = Partial::default();
        fold(&mut partial, &config, 1, Some(3_700_000), serde_json::json!(1));
        let rows = partial.rows();
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.values[2] == int(1)));
        let error = partial
            .fold(
                &config,
                vec![int(1)],
                None,
                &[None, None, None, None, None, None],
                i64::MIN,
            )
            .unwrap_err();
        assert!(error.contains("no event time in `at`"), "{error}");
    }

    #[test]
    fn closed_windows_take_nothing_and_a_row_of_closed_windows_only_folds_nowhere() {
        let spec = WindowSpec {
            size_ms: 3_600_000,
            hop_ms: 900_000,
        };
        let config = config(Some(spec));
        let values = [None, None, None, None, None, None];
        let mut partial = Partial::default();
        // Windows starting 900,000 and 1,800,000 end at or before 5,400,000: closed.
        let folded = partial
            .fold(&config, vec![int(1)], Some(3_700_000), &values, 5_400_000)
            .expect("fold");
        assert_eq!(folded, 2);
        let starts: Vec<Option<i64>> = partial.by_window().into_keys().collect();
        assert_eq!(starts, [Some(2_700_000), Some(3_600_000)]);
        let late = partial
            .fold(&config, vec![int(1)], Some(3_700_000), &values, 7_200_000)
            .expect("fold");
        assert_eq!(late, 0);
        partial.drop_closed(spec.size_ms, 6_300_000);
        let starts: Vec<Option<i64>> = partial.by_window().into_keys().collect();
        assert_eq!(starts, [Some(3_600_000)]);
    }

    #[test]
    fn first_and_last_follow_event_time_whatever_order_rows_and_partials_come_in() {
        let spec = WindowSpec {
            size_ms: 60_000,
            hop_ms: 60_000,
        };
        let measure = |name: &str, kind| MeasureConfig {
            name: name.into(),
            kind,
            expr: Some("row.x".into()),
        };
        let config = AggregateConfig {
            group_by: vec![],
            window: Some(WindowConfig {
                column: "at".into(),
                lateness_ms: 0,
                spec,
            }),
            measures: vec![measure("first", MeasureKind::First), measure("last", MeasureKind::Last)],
        };
        // (time, value): the earliest is 10 at 1,000 ms (tied with 30: the least wins), the
        // latest 40 at 9,000 ms; a null at 500 ms is skipped.
        let rows = [
            (5_000, json!(20)),
            (1_000, json!(30)),
            (9_000, json!(40)),
            (1_000, json!(10)),
            (500, json!(null)),
        ];
        let fold_all = |order: &[usize], split: usize| {
            let (mut a, mut b) = (Partial::default(), Partial::default());
            for (n, &i) in order.iter().enumerate() {
                let (time, value) = &rows[i];
                let target = if n < split { &mut a } else { &mut b };
                target
                    .fold(
                        &config,
                        vec![],
                        Some(*time),
                        &[Some(value.clone()), Some(value.clone())],
                        i64::MIN,
                    )
                    .expect("fold");
            }
            b.merge(a);
            b.rows()
        };
        let forward = fold_all(&[0, 1, 2, 3, 4], 2);
        let backward = fold_all(&[4, 3, 2, 1, 0], 3);
        assert_eq!(forward, backward);
        assert_eq!(forward[0].values[1..], [int(10), int(40)]);
    }
}
