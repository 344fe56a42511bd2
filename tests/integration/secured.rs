//! The gateway between the stack's secured servers: a Kafka route consumes over the broker's
//! SASL_SSL listener (SCRAM-SHA-512, TLS verified against the stack's CA and the broker's
//! name) and writes to the secured Cassandra (`cassandra-secure`, CQL 9142: client TLS with a
//! client certificate required, `PasswordAuthenticator`, `CassandraAuthorizer`) as a role that
//! may only modify and select its keyspace — rows read back exact, committed offsets at the end,
//! malformed messages dead-lettered over SASL_SSL with their reasons. A wrong database password,
//! a CA that did not sign the node's certificate, no client certificate, a wrong Kafka password
//! and a CA that did not sign the broker's each stop start-up at once, naming the keys to look
//! at; no log line holds a password.

use std::path::Path;
use std::time::{Duration, Instant};

use shardgate::devkit::{self, Gateway};

use crate::pki::TestCa;
use crate::{gateway_binary, gateway_lock, wait_committed, Names};

const PARTITIONS: i32 = 2;
const VALID: u64 = 3_000;
const MALFORMED: u64 = 12;

/// Where the gateway's secrets and CAs come from.
struct Secured<'a> {
    role: &'a str,
    db_ca: &'a Path,
    /// The client certificate and key presented to the database (it requires one).
    db_identity: Option<(&'a Path, &'a Path)>,
    db_password: &'a Path,
    kafka_ca: &'a Path,
    kafka_password: &'a Path,
}

/// The gateway config: the orders route over Kafka's SASL_SSL listener (its dead letters
/// inherit the source's `security`), `[cluster]` on the secured Cassandra with `[cluster.tls]`
/// and `[cluster.auth]`.
fn secured_config(names: &Names, secured: &Secured<'_>) -> String {
    let routes = devkit::orders_route_toml(
        "orders",
        &names.keyspace,
        &names.topic,
        &names.group,
        &names.dead_letter_topic,
    );
    let plain_db = format!("contact_points = [\"{}\"]", devkit::CASSANDRA);
    let plain_kafka = format!("brokers = [\"{}\"]", devkit::KAFKA);
    let toml = devkit::gateway_toml(&routes);
    assert!(toml.contains(&plain_db) && toml.contains(&plain_kafka));
    let kafka_security = format!(
        "[route.source.security]\nprotocol = \"sasl_ssl\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"shardgate\"\n\
         password_file = {:?}\nca_file = {:?}\n\n[route.columns]",
        secured.kafka_password, secured.kafka_ca,
    );
    let identity = secured
        .db_identity
        .map(|(cert, key)| format!("cert_file = {cert:?}\nkey_file = {key:?}\n"))
        .unwrap_or_default();
    format!(
        "{}\n[cluster.tls]\nca_file = {:?}\n{identity}\n[cluster.auth]\nusername = \"{}\"\npassword_file = {:?}\n",
        toml.replace(
            &plain_db,
            &format!("contact_points = [\"{}\"]", devkit::CASSANDRA_SECURE)
        )
        .replace(&plain_kafka, &format!("brokers = [\"{}\"]", devkit::KAFKA_SECURE))
        .replacen("[route.columns]", &kafka_security, 1),
        secured.db_ca,
        secured.role,
        secured.db_password,
    )
}

/// Every one of the `VALID` sample orders reads back from `session` with its exact values.
async fn assert_orders_exact(session: &scylla::client::session::Session, keyspace: &str) {
    let report = devkit::verify_orders(session, keyspace, VALID)
        .await
        .expect("read back");
    assert_eq!(
        (report.rows, report.matching, report.missing),
        (VALID, VALID, 0),
        "{:?}",
        report.differences
    );
}

/// Starts a gateway with config `toml` (written to `dir/<name>.toml`) and waits for it to exit
/// on its own; its log.
fn refused_start(dir: &Path, name: &str, toml: String) -> String {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).expect("config");
    let log = dir.join(format!("{name}.log"));
    let mut gateway = Gateway::spawn(&gateway_binary(), &config, &log).expect("spawn");
    let started = Instant::now();
    while gateway.is_running() {
        // Generous: a refusal must stop start-up, not wait out `cluster.connect_wait_ms` (5 min).
        assert!(started.elapsed() < Duration::from_secs(90), "the gateway kept retrying");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::read_to_string(&gateway.log).expect("log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_flow_from_kafka_sasl_ssl_to_cassandra_with_tls_and_a_password() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured");
    let dir = &names.dir;
    let admin = devkit::connect_secure(devkit::CASSANDRA_SECURE, "cassandra", "cassandra")
        .await
        .expect("the secured Cassandra is up");
    devkit::create_orders_table(&admin, &names.keyspace)
        .await
        .expect("create table");
    // A role that may write and read this keyspace and nothing else.
    let role = "it_secured_writer";
    let password = format!("pw-{:016x}", rand_u64());
    admin
        .query_unpaged(format!("DROP ROLE IF EXISTS {role}"), &[])
        .await
        .expect("drop role");
    admin
        .query_unpaged(
            format!("CREATE ROLE {role} WITH PASSWORD = '{password}' AND LOGIN = true"),
            &[],
        )
        .await
        .expect("create role");
    for permission in ["MODIFY", "SELECT"] {
        admin
            .query_unpaged(
                format!("GRANT {permission} ON KEYSPACE {} TO {role}", names.keyspace),
                &[],
            )
            .await
            .expect("grant");
    }
    let db_password = dir.join("db-password");
    std::fs::write(&db_password, format!("{password}\n")).expect("password file");
    let kafka_password_file = devkit::stack_kafka_password_file();
    let kafka_password = std::fs::read_to_string(&kafka_password_file)
        .expect("the stack's Kafka password")
        .trim()
        .to_string();

    devkit::create_topic(&names.topic, PARTITIONS)
        .await
        .expect("Kafka is up");
    devkit::create_topic(&names.dead_letter_topic, 1)
        .await
        .expect("dead-letter topic");
    let mut messages: Vec<(String, Vec<u8>)> = (0..VALID)
        .map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        })
        .collect();
    let mut codes = Vec::new();
    for j in 0..MALFORMED {
        let (key, payload, code) = devkit::malformed_message(j);
        codes.push(code);
        messages.insert((j * 97) as usize, (key, payload));
    }
    let total = messages.len() as i64;
    devkit::produce(&names.topic, messages).expect("produce");

    let (client_cert, client_key) = devkit::stack_client_identity();
    let secured = Secured {
        role,
        db_ca: &devkit::stack_ca_file(),
        db_identity: Some((&client_cert, &client_key)),
        db_password: &db_password,
        kafka_ca: &devkit::stack_ca_file(),
        kafka_password: &kafka_password_file,
    };
    let config = dir.join("gateway.toml");
    std::fs::write(&config, secured_config(&names, &secured)).expect("config");
    let check = std::process::Command::new(gateway_binary())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check runs");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let gateway = Gateway::start(&gateway_binary(), &config, &dir.join("gateway.log")).expect("gateway starts");
    wait_committed(&names, PARTITIONS, total, Duration::from_secs(120));
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());

    assert_orders_exact(&admin, &names.keyspace).await;
    let letters = devkit::read_topic(&names.dead_letter_topic, MALFORMED as usize, Duration::from_secs(60))
        .expect("dead letters");
    let mut seen: Vec<&str> = letters
        .iter()
        .map(|letter| letter.headers["shardgate.reason.code"].as_str())
        .collect();
    seen.sort_unstable();
    codes.sort_unstable();
    assert_eq!(
        seen, codes,
        "every malformed message dead-lettered once, with its reason"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        !text.contains(&password) && !text.contains(&kafka_password),
        "a password is in the gateway's log"
    );

    // A wrong database password: start-up stops at once, naming the keys.
    let wrong_db = dir.join("wrong-db-password");
    let wrong = format!("{password}-wrong");
    std::fs::write(&wrong_db, &wrong).expect("wrong password file");
    let with_wrong_db = Secured {
        db_password: &wrong_db,
        ..secured
    };
    let text = refused_start(dir, "wrong-db", secured_config(&names, &with_wrong_db));
    assert!(
        text.contains("refused the gateway") && text.contains("cluster.auth.password_file"),
        "{text}"
    );
    assert!(
        !text.contains(&wrong) && !text.contains(&password),
        "a password is in the log"
    );

    // A CA that did not sign the node's certificate: the handshake fails, start-up stops.
    let rogue_ca = TestCa::new("another CA").write(dir, "rogue-ca");
    let with_rogue_ca = Secured {
        db_ca: &rogue_ca,
        ..secured
    };
    let text = refused_start(dir, "rogue-ca", secured_config(&names, &with_rogue_ca));
    assert!(
        text.contains("refused the gateway") && text.contains("cluster.tls"),
        "{text}"
    );

    // No client certificate: the node ends the handshake, start-up stops naming `cluster.tls`.
    let without_certificate = Secured {
        db_identity: None,
        ..secured
    };
    let text = refused_start(dir, "no-db-certificate", secured_config(&names, &without_certificate));
    assert!(
        text.contains("refused the gateway") && text.contains("cluster.tls"),
        "{text}"
    );

    // A wrong Kafka password: the route cannot subscribe, and says why.
    let wrong_kafka = dir.join("wrong-kafka-password");
    std::fs::write(&wrong_kafka, "not-the-password").expect("wrong password file");
    let with_wrong_kafka = Secured {
        kafka_password: &wrong_kafka,
        ..secured
    };
    let text = refused_start(dir, "wrong-kafka", secured_config(&names, &with_wrong_kafka));
    assert!(
        names_kafka_security(&text, "`password_file`") && text.contains("SASL authentication"),
        "{text}"
    );
    assert!(
        !text.contains("not-the-password") && !text.contains(&kafka_password),
        "a password is in the log"
    );

    // A CA that did not sign the broker's certificate: the handshake fails, the route says so.
    let with_rogue_kafka_ca = Secured {
        kafka_ca: &rogue_ca,
        ..secured
    };
    let text = refused_start(dir, "rogue-kafka-ca", secured_config(&names, &with_rogue_kafka_ca));
    assert!(names_kafka_security(&text, "`ca_file`"), "{text}");
}

/// Whether a refused start-up names the Kafka source's `security` and `key` among the keys to
/// check: in the route's own message, or in its dead letters' when they share the source's
/// brokers and `security` and are opened first.
fn names_kafka_security(text: &str, key: &str) -> bool {
    let source = text.contains("route `orders`: cannot reach Kafka") && text.contains("source.security");
    let dead_letters = text.contains("dead-letter topic") && text.contains("the source's `security`");
    (source || dead_letters) && text.contains(key)
}

/// A random 64-bit number from the OS.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("random");
    u64::from_le_bytes(bytes)
}

/// A nats-server of this test's own: JetStream, every client connection over TLS (the stack's
/// certificate for 127.0.0.1) with a client certificate of the stack's CA required
/// (`verify: true`), users `loader` (password) and one NKey user. Stopped on drop.
struct SecuredNats {
    child: std::process::Child,
    url: String,
}

impl SecuredNats {
    const PORT: u16 = 4233;

    fn start(dir: &Path, loader_password: &str, nkey_public: &str) -> SecuredNats {
        let pki = devkit::state_dir().join("pki");
        let conf = format!(
            "jetstream {{ store_dir: {store:?} }}\n\
             tls {{ cert_file: {cert:?}, key_file: {key:?}, ca_file: {ca:?}, verify: true }}\n\
             authorization {{ users = [ {{ user: \"loader\", password: \"{loader_password}\" }}, {{ nkey: \"{nkey_public}\" }} ] }}\n",
            store = dir.join("nats-js"),
            cert = pki.join("server.pem"),
            key = pki.join("server.key"),
            ca = pki.join("ca.pem"),
        );
        Self::spawn(dir, "nats", Self::PORT, &conf)
    }

    /// Starts `nats-server` on `port` with the config `conf` (written to `dir/<name>.conf`, its
    /// log to `dir/<name>.log`) and waits until it listens.
    fn spawn(dir: &Path, name: &str, port: u16, conf: &str) -> SecuredNats {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, format!("listen: \"127.0.0.1:{port}\"\n{conf}")).expect("nats conf");
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("nats log");
        let child = std::process::Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("nats-server (installed by deploy/local/stack.sh) starts");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nats-server `{name}` did not listen: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        SecuredNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }

    /// A client logged in as `loader`, over TLS trusting the stack's CA, with its client
    /// certificate.
    async fn loader(&self, password: &str) -> async_nats::Client {
        shardgate::tls::install_crypto_provider();
        let (cert, key) = devkit::stack_client_identity();
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(devkit::stack_ca_file())
            .add_client_certificate(cert, key)
            .user_and_password("loader".into(), password.into())
            .connect(&self.url)
            .await
            .expect("the loader connects over TLS")
    }
}

impl Drop for SecuredNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What [`jetstream_orders_flow`] leaves for the negative cases.
struct JetStreamFlow {
    /// The route's TOML without `security` (its `[route.columns]` is where it goes).
    route: String,
    /// The gateway's log.
    log: String,
}

/// The orders (and malformed messages) published through `loader` to a JetStream stream of the
/// server at `url`; a gateway with the JetStream route and `security` (a `[route.source.security]`
/// table) drains it: rows exact, every message acknowledged, each malformed one dead-lettered once
/// to a stream of the same server with its original bytes (the dead letters inherit `security`).
async fn jetstream_orders_flow(names: &Names, loader: &async_nats::Client, url: &str, security: &str) -> JetStreamFlow {
    let dir = &names.dir;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let (stream, subject, dead_stream, dead_subject) =
        ("IT_SECURED", "it.secured.orders", "IT_SECURED_DL", "it.secured.dead");
    devkit::create_stream_on(loader.clone(), stream, &[subject])
        .await
        .expect("stream");
    devkit::create_stream_on(loader.clone(), dead_stream, &[dead_subject])
        .await
        .expect("dead-letter stream");
    let good = (0..VALID).map(devkit::order_message_with_id);
    let malformed = (0..MALFORMED).map(|j| devkit::malformed_message(j).1);
    let sent = devkit::publish_jetstream_on(loader.clone(), subject, good.chain(malformed))
        .await
        .expect("publish over TLS");
    assert_eq!(sent, VALID + MALFORMED);

    let route = devkit::jetstream_orders_route_toml("orders", &names.keyspace, stream, subject, "gw", dead_subject)
        .replace(&format!("url = \"{}\"", devkit::NATS), &format!("url = \"{url}\""));
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        devkit::gateway_toml(&route.replacen("[route.columns]", &format!("{security}\n[route.columns]"), 1)),
    )
    .expect("config");
    let gateway = Gateway::start(&gateway_binary(), &config, &dir.join("gateway.log")).expect("gateway starts");
    let started = Instant::now();
    loop {
        let backlog = devkit::jetstream_backlog_on(loader.clone(), stream, "gw")
            .await
            .expect("backlog");
        if backlog == Some((0, 0)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "backlog {backlog:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());

    assert_orders_exact(&session, &names.keyspace).await;
    let letters = devkit::read_stream_on(loader.clone(), dead_stream, MALFORMED as usize, Duration::from_secs(30))
        .await
        .expect("dead letters");
    assert_eq!(letters.len() as u64, MALFORMED, "one dead letter per malformed message");
    for letter in &letters {
        let sequence: u64 = letter.headers["shardgate.source.sequence"].parse().expect("sequence");
        let j = sequence - VALID - 1;
        assert_eq!(letter.payload, devkit::malformed_message(j).1, "original bytes");
        assert!(letter.headers.contains_key("shardgate.reason.code"));
    }
    JetStreamFlow {
        route,
        log: std::fs::read_to_string(&log).expect("log"),
    }
}

/// A JetStream route of a NATS server that takes TLS connections with a client certificate
/// only and logs users in: the gateway connects over TLS (the stack's CA, the stack's client
/// certificate) as an NKey user — rows exact, every message acknowledged, the malformed ones
/// dead-lettered to a subject of the same server (the dead letters inherit the source's
/// `security`). An NKey the server does not know, and the right one without a client
/// certificate, stop start-up naming `security`; no seed appears in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_route_reads_over_tls_as_an_nkey_user() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured_nats");
    let dir = &names.dir;
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let seed_file = dir.join("gateway.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("seed file");
    let loader_password = format!("pw-{:016x}", rand_u64());
    let nats = SecuredNats::start(dir, &loader_password, &user.public_key());
    let loader = nats.loader(&loader_password).await;

    let (client_cert, client_key) = devkit::stack_client_identity();
    let identity = format!("cert_file = {client_cert:?}\nkey_file = {client_key:?}\n");
    let security_with = |seed_file: &Path, identity: &str| {
        format!(
            "[route.source.security]\nca_file = {:?}\nnkey_seed_file = {seed_file:?}\n{identity}",
            devkit::stack_ca_file()
        )
    };
    let flow = jetstream_orders_flow(&names, &loader, &nats.url, &security_with(&seed_file, &identity)).await;
    assert!(!flow.log.contains(seed.as_str()), "the NKey seed is in the log");
    let route = flow.route;
    let security = |seed_file: &Path| format!("{}\n[route.columns]", security_with(seed_file, &identity));

    // An NKey the server does not know: the connection is refused, start-up says where to look.
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let stranger_file = dir.join("stranger.nk");
    std::fs::write(&stranger_file, &stranger).expect("seed file");
    let text = refused_start(
        dir,
        "stranger",
        devkit::gateway_toml(&route.replacen("[route.columns]", &security(&stranger_file), 1)),
    );
    assert!(
        text.contains("cannot connect to NATS") && text.contains("check `security`"),
        "{text}"
    );
    assert!(!text.contains(stranger.as_str()), "the NKey seed is in the log");

    // The right NKey without a client certificate: the server's TLS refuses the connection.
    let text = refused_start(
        dir,
        "no-certificate",
        devkit::gateway_toml(&route.replacen(
            "[route.columns]",
            &format!("{}\n[route.columns]", security_with(&seed_file, "")),
            1,
        )),
    );
    assert!(
        text.contains("cannot connect to NATS") && text.contains("check `security`"),
        "{text}"
    );
}

/// A NATS JWT (`ed25519-nkey`, as nats-io/jwt v2 encodes them) of the `nats` claims about
/// `subject`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{:016X}{:016X}", rand_u64(), rand_u64()),
        "iat": issued,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64.encode(signature))
}

/// A `.creds` file (as `nsc` writes them) of a new user of `account`, written to
/// `dir/<name>.creds`; its path and the user's seed.
fn user_creds(dir: &Path, name: &str, account: &nkeys::KeyPair) -> (std::path::PathBuf, String) {
    let user = nkeys::KeyPair::new_user();
    let jwt = nats_jwt(
        account,
        &user.public_key(),
        name,
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let seed = user.seed().expect("seed");
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(
        &path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        ),
    )
    .expect("creds file");
    (path, seed)
}

/// A JetStream route of a NATS server in operator mode (decentralized JWT authentication: an
/// operator, an account with JetStream preloaded in the server's memory resolver, users whose
/// JWTs the account signed — all made here with the test's own NKeys), over TLS: the gateway
/// logs in with a `.creds` file (`creds_file`) — rows exact, every message acknowledged, the
/// malformed ones dead-lettered over the same login. A user of an account the operator never
/// signed stops start-up naming `security`; no seed appears in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_route_reads_as_the_user_of_a_creds_file() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured_creds");
    let dir = &names.dir;
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "shardgate-test",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "orders",
        serde_json::json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    // JetStream needs the server's system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"limits": {"subs": -1, "data": -1, "payload": -1, "conn": -1}, "type": "account", "version": 2}),
    );
    let operator_file = dir.join("operator.jwt");
    std::fs::write(&operator_file, &operator_jwt).expect("operator JWT");
    let pki = devkit::state_dir().join("pki");
    let conf = format!(
        "jetstream {{ store_dir: {store:?} }}\n\
         tls {{ cert_file: {cert:?}, key_file: {key:?} }}\n\
         operator: {operator_file:?}\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{ {account}: \"{account_jwt}\", {system}: \"{system_jwt}\" }}\n",
        store = dir.join("nats-js"),
        cert = pki.join("server.pem"),
        key = pki.join("server.key"),
        account = account.public_key(),
        system = system.public_key(),
    );
    let nats = SecuredNats::spawn(dir, "operator-nats", 4234, &conf);
    let (loader_creds, _) = user_creds(dir, "loader", &account);
    shardgate::tls::install_crypto_provider();
    let loader = async_nats::ConnectOptions::with_credentials_file(&loader_creds)
        .await
        .expect("the loader's creds")
        .require_tls(true)
        .add_root_certificates(devkit::stack_ca_file())
        .connect(&nats.url)
        .await
        .expect("the loader logs in with its creds");

    let (creds, seed) = user_creds(dir, "gateway", &account);
    let security = |creds: &Path| {
        format!(
            "[route.source.security]\nca_file = {:?}\ncreds_file = {creds:?}\n",
            devkit::stack_ca_file()
        )
    };
    let flow = jetstream_orders_flow(&names, &loader, &nats.url, &security(&creds)).await;
    assert!(!flow.log.contains(seed.as_str()), "the user's seed is in the log");

    // A user of an account the operator never signed: the server refuses the login.
    let (stranger, stranger_seed) = user_creds(dir, "stranger", &nkeys::KeyPair::new_account());
    let text = refused_start(
        dir,
        "stranger",
        devkit::gateway_toml(&flow.route.replacen(
            "[route.columns]",
            &format!("{}\n[route.columns]", security(&stranger)),
            1,
        )),
    );
    assert!(
        text.contains("cannot connect to NATS") && text.contains("check `security`"),
        "{text}"
    );
    assert!(!text.contains(stranger_seed.as_str()), "the seed is in the log");
}

/// A RabbitMQ route over `amqps://` (the stack's CA; the listener requires a client certificate
/// of it, and the route presents the stack's) as user `shardgate`, its password from a file:
/// rows exact, the queue drained, malformed messages dead-lettered over the same TLS
/// connection's broker (the dead letters inherit the source's `security`). A wrong password,
/// and no client certificate, each stop start-up naming `security`; no password appears in the
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_route_reads_over_amqps_with_a_client_certificate_and_a_password_file() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured_amqp");
    let dir = &names.dir;
    let (queue, dead_queue) = ("it.secured.amqp", "it.secured.amqp.dead");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::recreate_queue(queue).await.expect("RabbitMQ is up");
    devkit::recreate_queue(dead_queue).await.expect("dead-letter queue");
    let good = (0..VALID).map(devkit::order_message_with_id);
    let malformed = (0..MALFORMED).map(|j| devkit::malformed_message(j).1);
    let sent = devkit::publish_rabbitmq(queue, good.chain(malformed))
        .await
        .expect("publish");
    assert_eq!(sent, VALID + MALFORMED);

    let password_file = devkit::stack_rabbitmq_password_file();
    let password = std::fs::read_to_string(&password_file)
        .expect("the stack's RabbitMQ password")
        .trim()
        .to_string();
    let route = devkit::rabbitmq_orders_route_toml("orders", &names.keyspace, queue, dead_queue).replace(
        &format!("url = \"{}\"", devkit::AMQP),
        &format!("url = \"{}\"", devkit::AMQPS),
    );
    assert!(route.contains(devkit::AMQPS));
    let (client_cert, client_key) = devkit::stack_client_identity();
    let config_with = |password_file: &Path, identity: bool| {
        let identity = if identity {
            format!("cert_file = {client_cert:?}\nkey_file = {client_key:?}\n")
        } else {
            String::new()
        };
        let security = format!(
            "[route.source.security]\nusername = \"shardgate\"\npassword_file = {password_file:?}\nca_file = {:?}\n{identity}\n[route.columns]",
            devkit::stack_ca_file()
        );
        devkit::gateway_toml(&route.replacen("[route.columns]", &security, 1))
    };
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_with(&password_file, true)).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &config, &dir.join("gateway.log")).expect("gateway starts");
    devkit::wait_for_orders(&session, &names.keyspace, VALID, Duration::from_secs(120))
        .await
        .expect("rows arrive");
    let letters = devkit::read_queue(dead_queue, MALFORMED as usize, Duration::from_secs(60))
        .await
        .expect("dead letters");
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());

    assert_orders_exact(&session, &names.keyspace).await;
    assert_eq!(
        devkit::queue_depth(queue).await.expect("depth"),
        0,
        "every delivery acknowledged"
    );
    assert_eq!(letters.len() as u64, MALFORMED, "one dead letter per malformed message");
    for letter in &letters {
        assert!(
            (0..MALFORMED).any(|j| devkit::malformed_message(j).1 == letter.payload),
            "original bytes"
        );
        assert!(letter.headers.contains_key("shardgate.reason.code"));
    }
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(&password), "the password is in the log");

    // A wrong password: the broker refuses the login, start-up says where to look.
    let wrong_file = dir.join("wrong-password");
    std::fs::write(&wrong_file, "not-the-password\n").expect("wrong password file");
    let text = refused_start(dir, "wrong", config_with(&wrong_file, true));
    assert!(
        text.contains("cannot connect to RabbitMQ") && text.contains("check `security`"),
        "{text}"
    );
    assert!(
        !text.contains("not-the-password") && !text.contains(&password),
        "a password is in the log"
    );

    // The right password without a client certificate: the listener ends the handshake.
    let text = refused_start(dir, "no-certificate", config_with(&password_file, false));
    assert!(
        text.contains("cannot connect to RabbitMQ") && text.contains("`cert_file`"),
        "{text}"
    );
    assert!(!text.contains(&password), "the password is in the log");
}

/// A ZeroMQ route with CURVE: the gateway's PULL socket is a CURVE server with its secret key
/// from a file and an allow-list of client keys. Orders from the allowed client land exact and
/// its malformed messages are dead-lettered; a client with another key is refused in the
/// handshake (counted) and none of its rows is written; the secret key is not in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeromq_route_takes_only_the_allowed_curve_keys() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured_zmq");
    let dir = &names.dir;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let (dead_stream, dead_subject) = (format!("IT_szmq_{run}_DL"), format!("it.szmq.{run}.dead-letter"));
    devkit::create_stream(&dead_stream, &[&dead_subject])
        .await
        .expect("NATS with JetStream is up");

    let server = zmq::CurveKeyPair::new().expect("CURVE keys (libzmq built with libsodium)");
    let allowed = zmq::CurveKeyPair::new().expect("keys");
    let rogue = zmq::CurveKeyPair::new().expect("keys");
    let secret_text = shardgate::config::curve_key_text(&server.secret_key);
    let secret_file = dir.join("curve-secret");
    std::fs::write(&secret_file, format!("{secret_text}\n")).expect("secret key file");
    let clients_file = dir.join("curve-clients");
    std::fs::write(
        &clients_file,
        format!(
            "# the loader\n{}\n",
            shardgate::config::curve_key_text(&allowed.public_key)
        ),
    )
    .expect("client keys file");
    let route = devkit::zeromq_orders_route_toml("orders", &names.keyspace, &dead_subject).replacen(
        "bind = true",
        &format!(
            "bind = true\nsecurity = {{ curve_secret_key_file = {secret_file:?}, curve_client_keys_file = {clients_file:?} }}"
        ),
        1,
    );
    let config = dir.join("gateway.toml");
    std::fs::write(&config, devkit::gateway_toml(&route)).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &config, &dir.join("gateway.log")).expect("gateway starts");

    // The rogue client first: refused in the handshake, its rows never written.
    let rogue_ids = VALID..VALID + 50;
    let server_public = server.public_key;
    let refusals = tokio::task::spawn_blocking(move || {
        let socket = devkit::curve_pusher(devkit::ZMQ_ENDPOINT, &server_public, &rogue).expect("rogue socket");
        for i in rogue_ids {
            let (key, payload) = devkit::order_message(i);
            socket
                .send_multipart([key.into_bytes(), payload.into_bytes()], zmq::DONTWAIT)
                .expect("queued");
        }
        // Held until the gateway has refused it (then dropped, with what it queued).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let refused =
                devkit::scrape_metric(devkit::ADMIN_LISTEN, "shardgate_zeromq_peers_refused_total").unwrap_or(0.0);
            if refused >= 1.0 || Instant::now() > deadline {
                return refused;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("rogue thread");
    assert!(refusals >= 1.0, "the rogue key was not refused");

    // The allowed client: every order lands; malformed messages are dead-lettered.
    let sent = tokio::task::spawn_blocking(move || {
        let socket = devkit::curve_pusher(devkit::ZMQ_ENDPOINT, &server_public, &allowed).expect("socket");
        let good = (0..VALID)
            .map(devkit::order_message)
            .map(|(k, p)| (k.into_bytes(), p.into_bytes()));
        let malformed = (0..MALFORMED).map(|j| {
            let (key, payload, _) = devkit::malformed_message(j);
            (key.into_bytes(), payload)
        });
        let mut sent = 0u64;
        for (key, payload) in good.chain(malformed) {
            socket.send_multipart([key, payload], 0).expect("send");
            sent += 1;
        }
        // Linger is 0: keep the socket until the gateway has the messages.
        (sent, socket)
    })
    .await
    .expect("push thread");
    assert_eq!(sent.0, VALID + MALFORMED);
    devkit::wait_for_orders(&session, &names.keyspace, VALID, Duration::from_secs(120))
        .await
        .expect("the allowed client's rows arrive");
    let letters = devkit::read_stream(&dead_stream, MALFORMED as usize, Duration::from_secs(60))
        .await
        .expect("dead letters");
    drop(sent);
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());

    // Exactly the allowed client's orders: none of the rogue's ids.
    assert_orders_exact(&session, &names.keyspace).await;
    assert_eq!(letters.len() as u64, MALFORMED, "one dead letter per malformed message");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("ZeroMQ peer refused"), "the refusal is logged");
    assert!(!text.contains(&secret_text), "the CURVE secret key is in the log");
}

/// A Kafka route over the stack's SSL listener, which requires a client certificate of its CA:
/// with the stack's client certificate every order lands exact, offsets are committed and the
/// malformed messages are dead-lettered through the same listener (the dead letters inherit
/// the source's `security`); without a certificate, or with one of another CA, start-up stops
/// naming the route's TLS keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_route_reads_over_ssl_with_a_required_client_certificate() {
    let _lock = gateway_lock().await;
    let names = Names::new("secured_kafka_cert");
    let dir = &names.dir;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_topic(&names.topic, PARTITIONS)
        .await
        .expect("Kafka is up");
    devkit::create_topic(&names.dead_letter_topic, 1)
        .await
        .expect("dead-letter topic");
    let mut messages: Vec<(String, Vec<u8>)> = (0..VALID)
        .map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        })
        .collect();
    let mut codes = Vec::new();
    for j in 0..MALFORMED {
        let (key, payload, code) = devkit::malformed_message(j);
        codes.push(code);
        messages.insert((j * 89) as usize, (key, payload));
    }
    let total = messages.len() as i64;
    devkit::produce(&names.topic, messages).expect("produce");

    let routes = devkit::orders_route_toml(
        "orders",
        &names.keyspace,
        &names.topic,
        &names.group,
        &names.dead_letter_topic,
    );
    let plain = format!("brokers = [\"{}\"]", devkit::KAFKA);
    assert!(routes.contains(&plain));
    let config_with = |identity: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let mut security = format!(
            "[route.source.security]\nprotocol = \"ssl\"\nca_file = {:?}\n",
            devkit::stack_ca_file()
        );
        if let Some((cert, key)) = identity {
            security.push_str(&format!("cert_file = {cert:?}\nkey_file = {key:?}\n"));
        }
        devkit::gateway_toml(
            &routes
                .replace(&plain, &format!("brokers = [\"{}\"]", devkit::KAFKA_CLIENT_CERT))
                .replacen("[route.columns]", &format!("{security}\n[route.columns]"), 1),
        )
    };
    let identity = devkit::stack_client_identity();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_with(Some(&identity))).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &config, &dir.join("gateway.log")).expect("gateway starts");
    wait_committed(&names, PARTITIONS, total, Duration::from_secs(120));
    assert!(gateway.stop().expect("stop").success());
    assert_orders_exact(&session, &names.keyspace).await;
    let letters = devkit::read_topic(&names.dead_letter_topic, MALFORMED as usize, Duration::from_secs(60))
        .expect("dead letters");
    let mut seen: Vec<&str> = letters
        .iter()
        .map(|letter| letter.headers["shardgate.reason.code"].as_str())
        .collect();
    seen.sort_unstable();
    codes.sort_unstable();
    assert_eq!(
        seen, codes,
        "every malformed message dead-lettered once, with its reason"
    );

    // No client certificate, then one of another CA: the broker ends the handshake.
    let rogue = TestCa::new("another CA").issue(
        dir,
        "rogue-client",
        &["rogue"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    for (name, identity) in [("no-certificate", None), ("rogue-certificate", Some(&rogue))] {
        let text = refused_start(dir, name, config_with(identity));
        assert!(names_kafka_security(&text, "security"), "{name}: {text}");
    }

    // Dead letters of their own on the SASL_SSL listener with a wrong password: start-up stops
    // naming the dead letters' `security` (the source, on the certificate listener, is fine).
    let wrong = dir.join("wrong-kafka-password");
    std::fs::write(&wrong, "not-the-password\n").expect("password file");
    let dead_letters = format!(
        "topic = \"{}\"\nbrokers = [\"{}\"]\n\n[route.dead_letter.security]\nprotocol = \"sasl_ssl\"\n\
         mechanism = \"SCRAM-SHA-512\"\nusername = \"shardgate\"\npassword_file = {wrong:?}\nca_file = {:?}\n",
        names.dead_letter_topic,
        devkit::KAFKA_SECURE,
        devkit::stack_ca_file()
    );
    let toml =
        config_with(Some(&identity)).replacen(&format!("topic = \"{}\"", names.dead_letter_topic), &dead_letters, 1);
    assert!(toml.contains("[route.dead_letter.security]"), "{toml}");
    let text = refused_start(dir, "wrong-dead-letter-password", toml);
    assert!(
        text.contains("dead-letter topic") && text.contains("dead_letter.security"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "the password is in the log");
}
