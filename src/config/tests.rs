use super::*;
use scylla::frame::types::Consistency;
use std::time::Duration;

const VALID: &str = r#"
[cluster]
contact_points = ["127.0.0.1:9042"]
local_datacenter = "datacenter1"
consistency = "quorum"

[[route]]
name = "orders"
table = "shop.orders"
[route.source]
kind = "kafka"
brokers = ["127.0.0.1:9092"]
topic = "orders"
group_id = "shardgate-orders"
[route.columns]
order_id = "$key"
city = "customer.address.city"
[route.dead_letter]
kind = "kafka"
topic = "orders.dead-letter"
"#;

/// A directory of test files, removed on drop.
struct Scratch {
    dir: std::path::PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("shardgate-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        Scratch { dir }
    }

    fn write(&self, name: &str, text: String) -> std::path::PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn error_of(text: &str) -> String {
    Config::parse(text, "test.toml")
        .expect_err("config must be refused")
        .to_string()
}

#[test]
fn valid_config_parses_with_defaults() {
    let config = Config::parse(VALID, "test.toml").expect("valid config");
    assert_eq!(config.cluster.consistency, Consistency::Quorum);
    assert_eq!(config.runtime.cores, None);
    assert_eq!(config.runtime.island_threads, 1);
    let route = &config.routes[0];
    assert_eq!(route.targets.len(), 1);
    let target = &route.targets[0];
    assert_eq!((target.keyspace.as_str(), target.table.as_str()), ("shop", "orders"));
    assert!(route.delete_on_tombstone);
    assert_eq!(route.format, Format::Json);
    assert_eq!(
        target.columns,
        vec![
            ColumnMapping {
                column: "city".into(),
                field: FieldRef::Path(vec!["customer".into(), "address".into(), "city".into()])
            },
            ColumnMapping {
                column: "order_id".into(),
                field: FieldRef::Key
            },
        ]
    );
    let SourceConfig::Kafka(kafka) = &route.source else {
        panic!("a Kafka source");
    };
    assert_eq!(kafka.start_from, StartFrom::Earliest);
    let DeadLetterConfig::Kafka { brokers, topic, .. } = &route.dead_letter else {
        panic!("a Kafka dead-letter topic");
    };
    assert_eq!(
        (brokers.as_str(), topic.as_str()),
        ("127.0.0.1:9092", "orders.dead-letter")
    );
}

#[test]
fn unknown_key_is_refused_naming_it() {
    let text = VALID.replace("consistency = \"quorum\"", "consistency = \"quorum\"\nconsistancy = 1");
    let message = error_of(&text);
    assert!(message.contains("unknown field `consistancy`"), "{message}");
}

#[test]
fn unknown_key_in_tagged_source_is_refused() {
    let text = VALID.replace("group_id = \"shardgate-orders\"", "group_id = \"g\"\ngroupid = \"x\"");
    let message = error_of(&text);
    assert!(message.contains("groupid"), "{message}");
}

#[test]
fn bad_table_names_key_value_and_expectation() {
    let message = error_of(&VALID.replace("shop.orders", "orders"));
    assert_eq!(message, "`route[0].table` = `orders`: `keyspace.table`");
    let message = error_of(&VALID.replace("shop.orders", "shop.or-ders"));
    assert!(
        message.starts_with("`route[0].table` = `or-ders`: a CQL identifier"),
        "{message}"
    );
}

#[test]
fn bad_consistency_lists_choices() {
    let message = error_of(&VALID.replace("\"quorum\"", "\"most\""));
    assert!(
        message.starts_with("`cluster.consistency` = `most`: one of"),
        "{message}"
    );
}

#[test]
fn missing_dead_letter_is_refused_with_an_example() {
    let text = VALID.replace(
        "[route.dead_letter]\nkind = \"kafka\"\ntopic = \"orders.dead-letter\"\n",
        "",
    );
    let message = error_of(&text);
    assert!(message.starts_with("`route[0].dead_letter` = `(missing)`"), "{message}");
}

#[test]
fn dead_letter_topic_must_differ_from_source() {
    let message = error_of(&VALID.replace("\"orders.dead-letter\"", "\"orders\""));
    assert!(
        message.starts_with("`route[0].dead_letter.topic` = `orders`"),
        "{message}"
    );
}

#[test]
fn reserved_kafka_property_is_refused() {
    let text = VALID.replace(
        "group_id = \"shardgate-orders\"",
        "group_id = \"g\"\n[route.source.properties]\n\"enable.auto.commit\" = \"true\"",
    );
    let message = error_of(&text);
    assert!(
        message.starts_with("`route[0].source.properties.enable.auto.commit`"),
        "{message}"
    );
}

#[test]
fn bad_field_refs_are_refused() {
    assert!(error_of(&VALID.replace("\"$key\"", "\"$header\"")).contains("`$key`, `$key.<path>`"));
    assert!(error_of(&VALID.replace("\"$key\"", "\"$keys\"")).contains("route[0].columns.order_id"));
    assert!(error_of(&VALID.replace("\"customer.address.city\"", "\"customer..city\"")).contains("non-empty names"));
}

#[test]
fn cores_accepts_auto_or_bounded_number() {
    let with = |cores: &str| VALID.replace("[[route]]", &format!("[runtime]\ncores = {cores}\n\n[[route]]"));
    assert_eq!(Config::parse(&with("3"), "t").expect("3 cores").runtime.cores, Some(3));
    assert!(error_of(&with("0")).starts_with("`runtime.cores` = `0`"));
    assert!(error_of(&with("\"many\"")).starts_with("`runtime.cores` = `\"many\"`"));
}

#[test]
fn routes_need_unique_names_and_at_least_one() {
    let twice = format!("{VALID}\n{}", &VALID[VALID.find("[[route]]").expect("route")..]);
    assert!(error_of(&twice).starts_with("`route[1].name` = `orders`"));
    let none = &VALID[..VALID.find("[[route]]").expect("route")];
    assert!(error_of(none).starts_with("`route` = `[]`"));
    let ingest_only = format!("{none}\n[ingest]\nlisten = \"127.0.0.1:50051\"\ncore_port_base = 50100\n");
    let config = Config::parse(&ingest_only, "t").expect("ingest without routes");
    let ingest = config.ingest.expect("ingest");
    assert_eq!(ingest.core_addr(2), Some("127.0.0.1:50102".parse().expect("addr")));
    assert_eq!(ingest.advertise_host, "127.0.0.1");
    let bad = format!("{none}\n[ingest]\nlisten = \"localhost\"\n");
    assert!(error_of(&bad).starts_with("`ingest.listen` = `localhost`"));
}

#[test]
fn contact_point_needs_a_port() {
    let message = error_of(&VALID.replace("127.0.0.1:9042", "127.0.0.1"));
    assert!(
        message.starts_with("`cluster.contact_points` = `127.0.0.1`"),
        "{message}"
    );
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../deploy/shardgate.example.toml");
    let config = Config::parse(text, "deploy/shardgate.example.toml").expect("example config validates");
    assert_eq!(config.routes.len(), 3);
    let events = &config.routes[2];
    assert_eq!(events.targets.len(), 2);
    assert_eq!(
        events.ttl,
        Some(TtlConfig::Field(FieldRef::Path(vec!["retention_s".into()])))
    );
    assert!(events.filter.is_some() && events.delete_when.is_some());
    assert!(matches!(&events.dead_letter, DeadLetterConfig::Table { table, .. } if table == "dead_letters"));
    assert_eq!(config.routes[0].targets[0].columns.len(), 5);
    assert!(matches!(config.routes[1].source, SourceConfig::JetStream(_)));
    assert!(matches!(config.routes[1].dead_letter, DeadLetterConfig::Nats { .. }));
    assert_eq!(config.runtime.write_batch_rows_max, 64);
    assert_eq!(
        config.ingest.expect("ingest").core_addr(1),
        Some("127.0.0.1:50101".parse().expect("addr"))
    );
    assert_eq!(
        config.admin.map(|a| a.listen),
        Some("127.0.0.1:9190".parse().expect("addr"))
    );
}

const JETSTREAM: &str = r#"
[cluster]
contact_points = ["127.0.0.1:9042"]

[[route]]
name = "orders"
table = "shop.orders"
[route.source]
kind = "jetstream"
url = "nats://127.0.0.1:4222"
stream = "ORDERS"
subjects = ["orders.>"]
durable = "shardgate-orders"
[route.dead_letter]
kind = "nats"
subject = "orders.dead-letter"
"#;

#[test]
fn jetstream_route_parses_with_defaults_and_nats_dead_letters() {
    let config = Config::parse(JETSTREAM, "test.toml").expect("valid");
    let route = &config.routes[0];
    let SourceConfig::JetStream(js) = &route.source else {
        panic!("a JetStream source");
    };
    assert_eq!(
        (js.stream.as_str(), js.durable.as_str()),
        ("ORDERS", "shardgate-orders")
    );
    assert_eq!(js.max_ack_pending, 4096);
    assert_eq!(js.ack_wait, Duration::from_secs(30));
    let DeadLetterConfig::Nats { url, subject, .. } = &route.dead_letter else {
        panic!("a NATS dead-letter subject");
    };
    assert_eq!(
        (url.as_str(), subject.as_str()),
        ("nats://127.0.0.1:4222", "orders.dead-letter")
    );
}

#[test]
fn bad_jetstream_keys_are_named() {
    let cases = [
        ("stream = \"ORDERS\"", "stream = \"OR DERS\"", "route[0].source.stream"),
        (
            "subjects = [\"orders.>\"]",
            "subjects = [\"orders..x\"]",
            "route[0].source.subjects[0]",
        ),
        (
            "url = \"nats://127.0.0.1:4222\"",
            "url = \"nats://nohost\"",
            "route[0].source.url",
        ),
        (
            "durable = \"shardgate-orders\"",
            "durable = \"shardgate-orders\"\nmax_ack_pending = 0",
            "max_ack_pending",
        ),
        (
            "durable = \"shardgate-orders\"",
            "durable = \"shardgate-orders\"\nack_wait_ms = 10",
            "ack_wait_ms",
        ),
        (
            "subject = \"orders.dead-letter\"",
            "subject = \"\"",
            "route[0].dead_letter.subject",
        ),
    ];
    for (from, to, key) in cases {
        let text = JETSTREAM.replace(from, to);
        let error = error_of(&text);
        assert!(error.contains(key), "`{to}`: {error}");
    }
}

#[test]
fn kafka_dead_letter_for_a_nats_source_needs_brokers() {
    let text = JETSTREAM.replace(
        "kind = \"nats\"\nsubject = \"orders.dead-letter\"",
        "kind = \"kafka\"\ntopic = \"orders.dead-letter\"",
    );
    assert!(error_of(&text).contains("dead_letter.brokers"), "{}", error_of(&text));
}

const BROKERS: &str = r#"
[cluster]
contact_points = ["127.0.0.1:9042"]

[[route]]
name = "rabbit"
table = "shop.orders"
[route.source]
kind = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "orders"
[route.dead_letter]
kind = "rabbitmq"
routing_key = "orders.dead-letter"

[[route]]
name = "zmq"
table = "shop.orders"
[route.source]
kind = "zeromq"
socket = "pull"
endpoint = "tcp://127.0.0.1:5557"
bind = true
[route.dead_letter]
kind = "nats"
url = "nats://127.0.0.1:4222"
subject = "orders.dead-letter"

[[route]]
name = "core"
table = "shop.orders"
[route.source]
kind = "nats"
url = "nats://127.0.0.1:4222"
subject = "orders.*"
queue_group = "shardgate"
[route.dead_letter]
kind = "nats"
subject = "orders.dead-letter"
"#;

#[test]
fn rabbitmq_zeromq_and_nats_routes_parse_with_defaults() {
    let config = Config::parse(BROKERS, "test.toml").expect("valid");
    let SourceConfig::Amqp(amqp) = &config.routes[0].source else {
        panic!("a RabbitMQ source");
    };
    assert_eq!(
        (amqp.queue.as_str(), amqp.prefetch, amqp.declare),
        ("orders", 1024, true)
    );
    let DeadLetterConfig::Amqp {
        url,
        exchange,
        routing_key,
        ..
    } = &config.routes[0].dead_letter
    else {
        panic!("a RabbitMQ dead-letter exchange");
    };
    assert_eq!(
        (url.as_str(), exchange.as_str(), routing_key.as_str()),
        (amqp.url.as_str(), "", "orders.dead-letter")
    );
    let SourceConfig::Zmq(zmq) = &config.routes[1].source else {
        panic!("a ZeroMQ source");
    };
    assert_eq!((zmq.socket, zmq.bind), (ZmqSocketKind::Pull, true));
    assert_eq!(zmq.subscribe, vec![String::new()]);
    let SourceConfig::Nats(nats) = &config.routes[2].source else {
        panic!("a NATS source");
    };
    assert_eq!(nats.queue_group.as_deref(), Some("shardgate"));
}

#[test]
fn bad_broker_keys_are_named() {
    let cases = [
        ("queue = \"orders\"", "queue = \"\"", "route[0].source.queue"),
        (
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            "url = \"http://x\"",
            "route[0].source.url",
        ),
        (
            "routing_key = \"orders.dead-letter\"",
            "routing_key = \"orders\"",
            "route[0].dead_letter.routing_key",
        ),
        ("socket = \"pull\"", "socket = \"push\"", "route[1].source.socket"),
        (
            "endpoint = \"tcp://127.0.0.1:5557\"",
            "endpoint = \"127.0.0.1:5557\"",
            "route[1].source.endpoint",
        ),
        (
            "subject = \"orders.*\"",
            "subject = \"orders..x\"",
            "route[2].source.subject",
        ),
    ];
    for (from, to, key) in cases {
        let text = BROKERS.replacen(from, to, 1);
        let error = error_of(&text);
        assert!(error.contains(key), "`{to}`: {error}");
    }
}

/// The single-table route of `VALID` with extra route keys spliced in before `[route.source]`.
fn with_route_keys(keys: &str) -> String {
    VALID.replace("[route.source]", &format!("{keys}\n[route.source]"))
}

#[test]
fn mapping_keys_parse_into_targets_expressions_ttl_and_timestamp() {
    let text = VALID.replace(
        "table = \"shop.orders\"\n",
        "filter = \"msg.status != 'test'\"\ndelete_when = \"msg.op == 'd'\"\nttl = 3600\n\
         timestamp = \"updated_at\"\ntimestamp_unit = \"us\"\ntable_from = \"$header.kind\"\n\
         [[route.target]]\ntable = \"shop.orders\"\nwhen = \"has(msg.total)\"\n\
         [route.target.columns]\norder_id = \"$key.id\"\ntotal = { expr = \"msg.qty * msg.price\" }\n\
         [[route.target]]\ntable = \"shop.orders_by_customer\"\n",
    );
    let text = text.replace(
        "[route.columns]\norder_id = \"$key\"\ncity = \"customer.address.city\"\n",
        "",
    );
    let config = Config::parse(&text, "test.toml").expect("valid");
    let route = &config.routes[0];
    assert_eq!(route.targets.len(), 2);
    assert_eq!(route.targets[0].when.as_deref(), Some("has(msg.total)"));
    assert_eq!(
        route.targets[0].columns,
        vec![
            ColumnMapping {
                column: "order_id".into(),
                field: FieldRef::KeyPath(vec!["id".into()])
            },
            ColumnMapping {
                column: "total".into(),
                field: FieldRef::Expr("msg.qty * msg.price".into())
            },
        ]
    );
    assert!(route.targets[1].columns.is_empty());
    assert_eq!(route.table_from, Some(FieldRef::Header("kind".into())));
    assert_eq!(route.filter.as_deref(), Some("msg.status != 'test'"));
    assert_eq!(route.delete_when.as_deref(), Some("msg.op == 'd'"));
    assert_eq!(route.ttl, Some(TtlConfig::Seconds(3600)));
    assert_eq!(
        route.timestamp,
        Some(TimestampConfig {
            field: FieldRef::Path(vec!["updated_at".into()]),
            unit: TimeUnit::Micros
        })
    );
    assert_eq!(route.tables_label(), "shop.orders,shop.orders_by_customer");
}

#[test]
fn bad_mapping_keys_are_named() {
    let cases = [
        (with_route_keys("filter = \"msg.qty >\""), "route[0].filter"),
        (with_route_keys("delete_when = \"(\""), "route[0].delete_when"),
        (with_route_keys("ttl = -5"), "route[0].ttl"),
        (with_route_keys("ttl = 1.5"), "route[0].ttl"),
        (with_route_keys("timestamp_unit = \"ns\""), "route[0].timestamp_unit"),
        (with_route_keys("format = \"avro\""), "route[0].format"),
        (with_route_keys("format = \"protobuf\""), "route[0].protobuf"),
        (
            with_route_keys("format = \"protobuf\"\n[route.protobuf]\nmessage = \"shop.Order\""),
            "route[0].protobuf",
        ),
        (
            with_route_keys(
                "format = \"protobuf\"\n[route.protobuf]\nmessage = \"shop..Order\"\nfiles = [\"o.proto\"]",
            ),
            "route[0].protobuf.message",
        ),
        (
            VALID.replace("city = \"customer.address.city\"", "city = { expr = \"msg.\" }"),
            "route[0].columns.city.expr",
        ),
        (
            with_route_keys("[[route.target]]\ntable = \"shop.other\""),
            "route[0].table",
        ),
        (
            VALID
                .replace("table = \"shop.orders\"\n", "format = \"text\"\n")
                .replace(
                    "[route.columns]\norder_id = \"$key\"\ncity = \"customer.address.city\"\n",
                    "",
                )
                .replace(
                    "[route.source]",
                    "[[route.target]]\ntable = \"shop.raw\"\n[route.source]",
                ),
            "route[0].target[0].columns",
        ),
    ];
    for (text, key) in cases {
        let message = error_of(&text);
        assert!(message.contains(key), "expected `{key}` in: {message}");
    }
}

/// Three routes, so paths carry an index other than 0: the third has a RabbitMQ source.
fn three_routes(third_source: &str, third_columns: &str) -> String {
    let second = VALID
        .split("[[route]]")
        .nth(1)
        .expect("a route")
        .replace("name = \"orders\"", "name = \"orders2\"")
        .replace("group_id = \"shardgate-orders\"", "group_id = \"g2\"");
    let third = format!(
        "[[route]]\nname = \"queue\"\ntable = \"shop.orders\"\n[route.source]\n{third_source}\n[route.columns]\n{third_columns}\n[route.dead_letter]\nkind = \"table\"\ntable = \"shop.dead\"\n"
    );
    format!("{VALID}\n[[route]]{second}\n{third}")
}

/// A wrong type nested in a tagged table names the full key path, the value and what is
/// expected (issue 11, item 4).
#[test]
fn wrong_types_in_nested_tables_name_the_full_key_path() {
    let rabbit = "kind = \"rabbitmq\"\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"";
    let text = three_routes(&format!("{rabbit}\nprefetch = \"lots\""), "order_id = \"$key\"");
    let message = error_of(&text);
    assert!(message.contains("`route[2].source.prefetch`"), "{message}");
    assert!(message.contains("\"lots\""), "{message}");
    assert!(message.contains("expected a whole number from 0 to 65535"), "{message}");

    let text = VALID.replace(
        "group_id = \"shardgate-orders\"",
        "group_id = \"shardgate-orders\"\ncommit_interval_ms = \"1s\"",
    );
    let message = error_of(&text);
    assert!(message.contains("`route[0].source.commit_interval_ms`"), "{message}");
    assert!(message.contains("string \"1s\""), "{message}");
    assert!(message.contains(", line "), "the line of the key: {message}");

    let text = VALID.replace("group_id = \"shardgate-orders\"", "group_id = 7");
    let message = error_of(&text);
    assert!(message.contains("`route[0].source.group_id`"), "{message}");

    let text = VALID.replace("topic = \"orders.dead-letter\"", "topic = [\"a\"]");
    let message = error_of(&text);
    assert!(message.contains("`route[0].dead_letter.topic`"), "{message}");

    let text = VALID.replace("kind = \"kafka\"\nbrokers", "kind = \"kafkaa\"\nbrokers");
    let message = error_of(&text);
    assert!(message.contains("`route[0].source.kind`"), "{message}");
    assert!(
        message.contains("unknown kind `kafkaa`, expected one of `kafka`"),
        "{message}"
    );

    let text = VALID.replace("kind = \"kafka\"\nbrokers", "brokers");
    let message = error_of(&text);
    assert!(message.contains("`route[0].source`: missing field `kind`"), "{message}");
}

/// A number where a column mapping is expected names the column's key and both accepted forms;
/// so does an unknown key in an expression table.
#[test]
fn bad_column_mappings_name_the_column_key() {
    let text = three_routes(
        "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"a.>\"",
        "qty = 5",
    );
    let message = error_of(&text);
    assert!(message.contains("`route[2].columns.qty`"), "{message}");
    assert!(message.contains("integer `5`"), "{message}");
    assert!(message.contains("a field path in quotes"), "{message}");
    assert!(message.contains("{ expr = \"CEL\" }"), "{message}");

    let text = VALID.replace("city = \"customer.address.city\"", "city = { exp = \"1\" }");
    let message = error_of(&text);
    assert!(message.contains("`route[0].columns.city"), "{message}");
    assert!(message.contains("unknown field `exp`"), "{message}");
}

/// Top-level and runtime keys keep their paths too; unknown keys name where they are.
#[test]
fn wrong_types_at_any_depth_name_their_path() {
    let message = error_of(&format!("{VALID}\n[runtime]\ninflight_rows_per_core_max = -3\n"));
    assert!(message.contains("`runtime.inflight_rows_per_core_max`"), "{message}");
    let message = error_of(&VALID.replace("contact_points = [\"127.0.0.1:9042\"]", "contact_points = [9042]"));
    assert!(message.contains("`cluster.contact_points[0]`"), "{message}");
    let message = error_of(&VALID.replace("kind = \"kafka\"\ntopic", "kind = \"kafka\"\ntopics = \"x\"\ntopic"));
    assert!(message.contains("`route[0].dead_letter.topics`"), "{message}");
    assert!(message.contains("unknown field `topics`"), "{message}");
}

/// `runtime.gateway_id` is checked for Kafka's legal characters; the default comes from the
/// host name and a fixed listener port, and is absent without one.
#[test]
fn gateway_id_is_validated_and_defaulted() {
    let config = Config::parse(&format!("{VALID}\n[runtime]\ngateway_id = \"gw-1.eu\"\n"), "t").expect("valid");
    assert_eq!(config.gateway_id().as_deref(), Some("gw-1.eu"));
    let message = error_of(&format!("{VALID}\n[runtime]\ngateway_id = \"gw 1\"\n"));
    assert!(message.starts_with("`runtime.gateway_id` = `gw 1`"), "{message}");
    let config = Config::parse(VALID, "t").expect("valid");
    assert_eq!(config.gateway_id(), None);
    let config = Config::parse(&format!("{VALID}\n[admin]\nlisten = \"127.0.0.1:9190\"\n"), "t").expect("valid");
    assert!(config.gateway_id().expect("derived").ends_with("-9190"));
    let message = error_of(&VALID.replace(
        "group_id = \"shardgate-orders\"",
        "group_id = \"g\"\nproperties = { \"group.instance.id\" = \"x\" }",
    ));
    assert!(message.contains("group.instance.id"), "{message}");
}

/// `$subject` maps a message's own subject.
#[test]
fn subject_field_ref_parses() {
    let config = Config::parse(&VALID.replace("\"customer.address.city\"", "\"$subject\""), "t").expect("valid");
    let columns = &config.routes[0].targets[0].columns;
    assert!(columns.iter().any(|c| c.field == FieldRef::Subject), "{columns:?}");
}

#[test]
fn query_keys_default_and_bad_values_name_their_key() {
    let none = &VALID[..VALID.find("[[route]]").expect("route")];
    let ingest = format!("{none}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n");
    let config = Config::parse(&ingest, "t").expect("ingest without [query]");
    assert_eq!(config.query.page_size_default, 100);
    assert_eq!(config.query.scan_reads_per_core_max, 16);
    assert_eq!(config.query.consistency, Consistency::LocalQuorum);
    let with = |keys: &str| format!("{ingest}\n[query]\n{keys}\n");
    let config = Config::parse(&with("scan_reads_per_core_max = 3"), "t").expect("valid");
    assert_eq!(config.query.scan_reads_per_core_max, 3);
    for (keys, starts) in [
        ("scan_reads_per_core_max = 0", "`query.scan_reads_per_core_max` = `0`"),
        (
            "scan_parallel_splits_max = 65",
            "`query.scan_parallel_splits_max` = `65`",
        ),
        ("scan_splits_per_core = 0", "`query.scan_splits_per_core` = `0`"),
        ("page_size_max = 100001", "`query.page_size_max` = `100001`"),
        ("page_size_default = 20000", "`query.page_size_default` = `20000`"),
        ("consistency = \"any\"", "`query.consistency` = `any`"),
    ] {
        let message = error_of(&with(keys));
        assert!(message.starts_with(starts), "{keys}: {message}");
    }
}

/// A job's keys: defaults, a whole aggregate job read back, and each bad value named by its
/// full key path.
#[test]
fn job_keys_default_and_bad_values_name_their_key() {
    let none = &VALID[..VALID.find("[[route]]").expect("route")];
    let ingest = format!("{none}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n");
    let job = |extra: &str| {
        format!(
            "{ingest}\n[[job]]\nname = \"hourly\"\n{extra}\n[job.source]\ntable = \"shop.orders\"\n\
             columns = [\"customer_id\", \"amount\", \"placed_at\"]\n\
             [job.aggregate]\ngroup_by = [\"customer_id\"]\n\
             window = {{ column = \"placed_at\", size = \"1h\", hop = \"15m\" }}\n\
             measures = {{ orders = \"count()\", revenue = \"sum(row.amount)\", biggest = \"max(row.amount)\" }}\n\
             [[job.sink]]\ntable = \"shop.revenue_hourly\"\n"
        )
    };
    let config = Config::parse(&job(""), "t").expect("a valid job");
    let parsed = &config.jobs[0];
    assert_eq!(parsed.state_keyspace, "shardgate");
    assert_eq!(parsed.lease, std::time::Duration::from_secs(30));
    assert_eq!(parsed.parallel_splits, 4);
    assert_eq!(
        parsed.sinks,
        [crate::config::JobSinkConfig::Table("shop.revenue_hourly".into())]
    );
    let aggregate = parsed.aggregate.as_ref().expect("aggregate");
    let window = aggregate.window.as_ref().expect("window");
    assert_eq!((window.spec.size_ms, window.spec.hop_ms), (3_600_000, 900_000));
    let measures: Vec<(&str, crate::config::MeasureKind)> =
        aggregate.measures.iter().map(|m| (m.name.as_str(), m.kind)).collect();
    assert_eq!(
        measures,
        [
            ("biggest", crate::config::MeasureKind::Max),
            ("orders", crate::config::MeasureKind::Count),
            ("revenue", crate::config::MeasureKind::Sum),
        ]
    );
    for (source, starts) in [
        (job("lease = \"0s\""), "`job[0].lease` = `0s`"),
        (job("lease = \"soon\""), "`job[0].lease` = `soon`"),
        (job("parallel_splits = 0"), "`job[0].parallel_splits` = `0`"),
        (job("state_keyspace = \"a-b\""), "`job[0].state_keyspace` = `a-b`"),
        (job("filter = \"row.amount >\""), "`job[0].filter` = `row.amount >`"),
        (
            job("").replace("hop = \"15m\"", "hop = \"7m\""),
            "`job[0].aggregate.window.hop` = `7m`",
        ),
        (
            job("").replace("size = \"1h\"", "size = \"1 week\""),
            "`job[0].aggregate.window.size` = `1 week`",
        ),
        (
            job("").replace("column = \"placed_at\"", "column = \"status\""),
            "`job[0].aggregate.window.column` = `status`",
        ),
        (
            job("").replace("group_by = [\"customer_id\"]", "group_by = [\"store\"]"),
            "`job[0].aggregate.group_by[0]` = `store`",
        ),
        (
            job("").replace("sum(row.amount)", "median(row.amount)"),
            "`job[0].aggregate.measures.revenue` = `median(row.amount)`",
        ),
        (
            job("").replace("\"count()\"", "\"count(row.amount)\""),
            "`job[0].aggregate.measures.orders` = `count(row.amount)`",
        ),
        (
            format!("{}[job.protobuf]\nmessage = \"shop.Hourly\"\nfiles = [\"h.proto\"]\n", job("")),
            "`job[0].protobuf` = `shop.Hourly`",
        ),
        (
            job("").replace(
                "table = \"shop.revenue_hourly\"",
                "kafka = { brokers = [\"k:9092\"], topic = \"r\" }\n[job.protobuf]\nmessage = \"a..b\"\nfiles = [\"h.proto\"]",
            ),
            "`job[0].protobuf.message` = `a..b`",
        ),
        (
            job("")
                .replace(
                    "window = { column = \"placed_at\", size = \"1h\", hop = \"15m\" }\n",
                    "",
                )
                .replace("max(row.amount)", "first(row.amount)"),
            "`job[0].aggregate.measures.biggest` = `first(row.amount)`",
        ),
        (
            job("").replace("table = \"shop.revenue_hourly\"", "table = \"revenue\""),
            "`job[0].sink[0].table` = `revenue`",
        ),
        (
            job("").replace("[[job.sink]]\ntable = \"shop.revenue_hourly\"\n", ""),
            "`job[0].sink` = `[]`",
        ),
        (
            format!("{}\n{}", job(""), &job("")[ingest.len()..]),
            "`job[1].name` = `hourly`",
        ),
        (
            job("").replace(
                "table = \"shop.revenue_hourly\"",
                "table = \"shop.r\"\nkafka = { brokers = [\"k:9092\"], topic = \"r\" }",
            ),
            "`job[0].sink[0]` = `{table, kafka}`",
        ),
        (
            job("").replace(
                "table = \"shop.revenue_hourly\"",
                "kafka = { brokers = [\"k:9092\"], topic = \"a b\" }",
            ),
            "`job[0].sink[0].kafka.topic` = `a b`",
        ),
        (
            job("").replace(
                "table = \"shop.revenue_hourly\"",
                "nats = { url = \"nats://n\", subject = \"r\" }",
            ),
            "`job[0].sink[0].nats.url` = `nats://n`",
        ),
        (
            job("").replace(
                "table = \"shop.revenue_hourly\"",
                "rabbitmq = { url = \"http://r\", routing_key = \"q\" }",
            ),
            "`job[0].sink[0].rabbitmq.url` = `http://r`",
        ),
    ] {
        let message = error_of(&source);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    let without_ingest = job("").replacen(&ingest, VALID, 1);
    assert!(
        error_of(&without_ingest).starts_with("`job` = `1 job(s)`"),
        "{}",
        error_of(&without_ingest)
    );
}

/// A stream job's keys: defaults, and each bad value named by its full key path (a route that
/// is missing or not Kafka, scan-only keys, no window, lateness on a scan job).
#[test]
fn stream_job_keys_default_and_bad_values_name_their_key() {
    let with_ingest = format!("{VALID}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n");
    let job = |source: &str, window: &str| {
        format!(
            "{with_ingest}\n[[job]]\nname = \"city_minutes\"\n[job.source]\n{source}\n\
             [job.aggregate]\ngroup_by = [\"city\"]\n{window}\n\
             measures = {{ orders = \"count()\" }}\n[[job.sink]]\ntable = \"shop.city_minutes\"\n"
        )
    };
    let window = "window = { column = \"placed_at\", size = \"1m\", lateness = \"2m\" }";
    let config = Config::parse(&job("stream = [\"orders\"]", window), "t").expect("a valid stream job");
    let parsed = &config.jobs[0];
    assert_eq!(parsed.stream, ["orders"]);
    assert!(parsed.table.is_empty());
    assert_eq!(parsed.checkpoint, std::time::Duration::from_secs(1));
    assert_eq!(parsed.idle, std::time::Duration::from_secs(30));
    let lateness = parsed
        .aggregate
        .as_ref()
        .and_then(|a| a.window.as_ref())
        .map(|w| w.lateness_ms);
    assert_eq!(lateness, Some(120_000));
    for (source, starts) in [
        (
            job("stream = [\"payments\"]", window),
            "`job[0].source.stream[0]` = `payments`",
        ),
        (
            job("stream = [\"orders\"]\ntable = \"shop.orders\"", window),
            "`job[0].source` = `{table, stream}`",
        ),
        (job("", window), "`job[0].source` = `{}`"),
        (
            job("stream = [\"orders\"]\ncolumns = [\"city\"]", window),
            "`job[0].source.columns` = `set`",
        ),
        (job("stream = [\"orders\"]", ""), "`job[0].aggregate.window` = `absent`"),
        (
            job("stream = [\"orders\"]\ncheckpoint = \"5m\"", window),
            "`job[0].source.checkpoint` = `5m`",
        ),
        (
            job("stream = [\"orders\"]\nidle = \"0s\"", window),
            "`job[0].source.idle` = `0s`",
        ),
        (
            job("stream = [\"orders\"]", &window.replace("2m", "2 minutes")),
            "`job[0].aggregate.window.lateness` = `2 minutes`",
        ),
        (
            job("table = \"shop.orders\"", window),
            "`job[0].aggregate.window.lateness` = `2m`",
        ),
    ] {
        let message = error_of(&source);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    // A query job: one SELECT with its binds; no scan keys, nothing but SELECT.
    let query =
        "query = \"SELECT status, amount FROM shop.orders WHERE status = ? ALLOW FILTERING\"\nbinds = [\"paid\"]";
    let plain = "window = { column = \"placed_at\", size = \"1m\" }";
    let config = Config::parse(&job(query, plain), "t").expect("a valid query job");
    assert_eq!(config.jobs[0].binds, [serde_json::json!("paid")]);
    assert!(config.jobs[0].query.as_deref().is_some_and(|q| q.starts_with("SELECT")));
    for (source, starts) in [
        (
            job("query = \"DELETE FROM shop.orders WHERE id = 1\"", plain),
            "`job[0].source.query` = `DELETE FROM shop.orders WHERE id = 1`",
        ),
        (
            job(&format!("{query}\ncolumns = [\"status\"]"), plain),
            "`job[0].source.columns` = `set`",
        ),
        (
            job(&format!("{query}\ntable = \"shop.orders\""), plain),
            "`job[0].source` = `{table, query}`",
        ),
        (
            job("table = \"shop.orders\"\nbinds = [1]", plain),
            "`job[0].source.binds` = `1 value(s)`",
        ),
        (
            job("query = \"SELECT * FROM shop.orders\"\nbinds = [[1]]", plain),
            "`job[0].source.binds[0]` = `[1]`",
        ),
    ] {
        let message = error_of(&source);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    // A stream route must be a Kafka or JetStream route.
    let nats = job("stream = [\"orders\"]", window)
        .replace(
            "kind = \"kafka\"\nbrokers = [\"127.0.0.1:9092\"]\ntopic = \"orders\"\ngroup_id = \"shardgate-orders\"",
            "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"orders\"",
        )
        .replace(
            "topic = \"orders.dead-letter\"",
            "topic = \"orders.dead-letter\"\nbrokers = [\"127.0.0.1:9092\"]",
        );
    let message = error_of(&nats);
    assert!(message.starts_with("`job[0].source.stream[0]` = `orders`"), "{message}");
    assert!(message.contains("a Kafka or JetStream route"), "{message}");
    // A JetStream route is read again from the stream sequence stored with the job's state.
    let jetstream = nats.replace(
        "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"orders\"",
        "kind = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nstream = \"ORDERS\"\ndurable = \"shardgate\"",
    );
    let config = Config::parse(&jetstream, "t").expect("a stream job over a JetStream route");
    assert_eq!(config.jobs[0].stream, ["orders"]);
}

/// A replay job names a route with a Kafka or table dead-letter destination and nothing the
/// route decides itself.
#[test]
fn replay_job_keys_name_their_key() {
    let with_ingest = format!("{VALID}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n");
    let job = |source: &str, extra: &str| {
        format!("{with_ingest}\n[[job]]\nname = \"orders_replay\"\n{extra}\n[job.source]\n{source}\n")
    };
    let config = Config::parse(&job("replay = \"orders\"", "every = \"15m\""), "t").expect("a valid replay job");
    let parsed = &config.jobs[0];
    assert_eq!(parsed.replay.as_deref(), Some("orders"));
    assert_eq!(parsed.kind(), "replay");
    assert_eq!(parsed.every, Some(std::time::Duration::from_secs(900)));
    assert!(parsed.sinks.is_empty() && parsed.aggregate.is_none());
    for (text, starts) in [
        (job("replay = \"payments\"", ""), "`job[0].source.replay` = `payments`"),
        (
            job("replay = \"orders\"\ntable = \"shop.orders\"", ""),
            "`job[0].source` = `{table, replay}`",
        ),
        (
            job("replay = \"orders\"", "filter = \"true\""),
            "`job[0].filter` = `set`",
        ),
        (
            job("replay = \"orders\"\n[[job.sink]]\ntable = \"shop.t\"", ""),
            "`job[0].sink` = `set`",
        ),
        (
            job("replay = \"orders\"\nwhere = \"a = 1\"", ""),
            "`job[0].source.where` = `set`",
        ),
        (job("replay = \"orders\"", "every = \"1y\""), "`job[0].every` = `1y`"),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    // Dead letters on a NATS subject keep nothing to replay.
    let nats = job("replay = \"orders\"", "").replace(
        "kind = \"kafka\"\ntopic = \"orders.dead-letter\"",
        "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"orders.dead\"",
    );
    let message = error_of(&nats);
    assert!(message.starts_with("`job[0].source.replay` = `orders`"), "{message}");
    assert!(message.contains("Kafka topic or a table"), "{message}");
}

/// `[ingest.tls]`: the files are read at `check`; a missing file, a key that is not the
/// certificate's, a bad `client_auth` and `required` without a CA each name their key.
#[test]
fn ingest_tls_files_are_checked_and_named() {
    let scratch = Scratch::new("tls-config");
    let dir = &scratch.dir;
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let cert = write("cert.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let other_key = write("other.key", other.signing_key.serialize_pem());
    let none = &VALID[..VALID.find("[[route]]").expect("route")];
    let with = |tls: &str| format!("{none}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n[ingest.tls]\n{tls}\n");
    let files = |cert: &std::path::Path, key: &std::path::Path| format!("cert_file = {cert:?}\nkey_file = {key:?}\n");
    let config = Config::parse(&with(&files(&cert, &key)), "t").expect("valid TLS");
    let tls = config.ingest.and_then(|i| i.tls).expect("tls");
    assert_eq!(tls.client_auth, crate::tls::ClientCerts::None);
    for (text, starts) in [
        (
            with(&files(&dir.join("missing.pem"), &key)),
            "`ingest.tls.cert_file` = `",
        ),
        (with(&files(&key, &key)), "`ingest.tls.cert_file` = `"),
        (with(&files(&cert, &other_key)), "`ingest.tls.key_file` = `"),
        (
            with(&format!("{}client_auth = \"sometimes\"", files(&cert, &key))),
            "`ingest.tls.client_auth` = `sometimes`",
        ),
        (
            with(&format!("{}client_auth = \"required\"", files(&cert, &key))),
            "`ingest.tls.client_ca_file` = `absent`",
        ),
        (
            with(&format!("{}client_cert_file = {cert:?}", files(&cert, &key))),
            "`ingest.tls.client_key_file` = `absent`",
        ),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    assert!(error_of(&with(&files(&cert, &other_key))).contains("does not serve"));
}

/// `[cluster.tls]` and `[cluster.auth]`: the files are read at `check`; each mistake names its
/// key, and neither the config's `Debug` nor an error shows the password.
#[test]
fn cluster_tls_and_auth_keys_name_their_key() {
    let scratch = Scratch::new("cluster-security");
    let dir = &scratch.dir;
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let ca = write("ca.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let other_key = write("other.key", other.signing_key.serialize_pem());
    let password_file = write("password", "s3cret-Pa55\n".to_string());
    let empty = write("empty", "\n".to_string());
    let route = VALID.find("[[route]]").expect("route");
    let with = |extra: &str| format!("{}{extra}\n{}", &VALID[..route], &VALID[route..]);
    let auth = |file: &std::path::Path| format!("[cluster.auth]\nusername = \"writer\"\npassword_file = {file:?}\n");
    let tls = |ca: &std::path::Path| format!("[cluster.tls]\nca_file = {ca:?}\n");

    let config = Config::parse(&with(&format!("{}{}", tls(&ca), auth(&password_file))), "t").expect("valid");
    assert!(config.cluster.tls.is_some());
    let credentials = config.cluster.credentials.as_ref().expect("credentials");
    assert_eq!(
        (credentials.username.as_str(), credentials.password.as_str()),
        ("writer", "s3cret-Pa55"),
        "the line break ends the password"
    );
    assert!(!format!("{:?}", config.cluster).contains("s3cret"));
    let identity = format!(
        "{}cert_file = {ca:?}\nkey_file = {key:?}\nverify_hostname = false\n",
        tls(&ca)
    );
    Config::parse(&with(&identity), "t").expect("a client identity");

    for (text, starts) in [
        (with(&tls(&dir.join("missing.pem"))), "`cluster.tls.ca_file` = `"),
        (with(&tls(&key)), "`cluster.tls.ca_file` = `"),
        (
            with(&format!("{}cert_file = {ca:?}\n", tls(&ca))),
            "`cluster.tls.key_file` = `absent`",
        ),
        (
            with(&format!("{}key_file = {key:?}\n", tls(&ca))),
            "`cluster.tls.cert_file` = `absent`",
        ),
        (
            with(&format!("{}cert_file = {ca:?}\nkey_file = {other_key:?}\n", tls(&ca))),
            "`cluster.tls.key_file` = `",
        ),
        (with(&auth(&dir.join("missing"))), "`cluster.auth.password_file` = `"),
        (with(&auth(&empty)), "`cluster.auth.password_file` = `"),
        (
            with("[cluster.auth]\nusername = \"\"\npassword_file = \"x\"\n"),
            "`cluster.auth.username` = `\"\"`",
        ),
        (
            with("[cluster.auth]\nusername = \"writer\"\npassword = \"inline\"\n"),
            "",
        ),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
        assert!(!message.contains("s3cret"), "{message}");
    }
    // An inline password is not a key: secrets come from files.
    assert!(error_of(&with("[cluster.auth]\nusername = \"writer\"\npassword = \"inline\"\n")).contains("password"));
}

/// Kafka `security`: SASL_SSL with a password file becomes librdkafka's properties (the
/// dead letter inherits it with the brokers); every mistake names its key; secrets are refused
/// in `properties`; `Debug` never shows the password.
#[test]
fn kafka_security_keys_name_their_key() {
    let scratch = Scratch::new("kafka-security");
    let dir = &scratch.dir;
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let ca = write("ca.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let other_key = write("other.key", other.signing_key.serialize_pem());
    let password = write("password", "k4fka-Secret\n".to_string());
    let columns = VALID.find("[route.columns]").expect("columns");
    let with = |security: &str| {
        format!(
            "{}[route.source.security]\n{security}\n{}",
            &VALID[..columns],
            &VALID[columns..]
        )
    };
    let sasl = format!(
        "protocol = \"sasl_ssl\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"sg\"\npassword_file = {password:?}\nca_file = {ca:?}\n"
    );
    let config = Config::parse(&with(&sasl), "t").expect("valid");
    let route = &config.routes[0];
    let SourceConfig::Kafka(kafka) = &route.source else {
        panic!("a Kafka source");
    };
    let security = kafka.security.as_ref().expect("security");
    let properties: Vec<(&str, &str)> = security.properties().collect();
    let ca_text = ca.display().to_string();
    assert_eq!(
        properties,
        vec![
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "sg"),
            ("sasl.password", "k4fka-Secret"),
            ("ssl.ca.location", ca_text.as_str()),
            ("ssl.endpoint.identification.algorithm", "https"),
        ]
    );
    assert!(!format!("{:?}", config.routes).contains("k4fka-Secret"));
    let DeadLetterConfig::Kafka {
        security: inherited, ..
    } = &route.dead_letter
    else {
        panic!("a Kafka dead letter");
    };
    assert_eq!(
        inherited.as_ref(),
        Some(security),
        "the dead letter uses the source's brokers and security"
    );

    let identity = format!("protocol = \"ssl\"\ncert_file = {ca:?}\nkey_file = {key:?}\nverify_hostname = false\n");
    Config::parse(&with(&identity), "t").expect("a client certificate");

    let at = "`route[0].source.security.";
    for (text, starts) in [
        (with("protocol = \"tls\""), format!("{at}protocol` = `tls`")),
        (with("protocol = \"sasl_ssl\""), format!("{at}mechanism` = `absent`")),
        (
            with("protocol = \"sasl_ssl\"\nmechanism = \"GSSAPI\""),
            format!("{at}mechanism` = `GSSAPI`"),
        ),
        (
            with("protocol = \"sasl_ssl\"\nmechanism = \"PLAIN\"\nusername = \"sg\""),
            format!("{at}password_file` = `absent`"),
        ),
        (
            with(&format!(
                "protocol = \"sasl_ssl\"\nmechanism = \"PLAIN\"\nusername = \"sg\"\npassword_file = {:?}",
                dir.join("missing")
            )),
            format!("{at}password_file` = `"),
        ),
        (with(&format!("ca_file = {ca:?}")), format!("{at}ca_file` = `given`")),
        (with("username = \"sg\""), format!("{at}username` = `given`")),
        (
            with(&format!("protocol = \"ssl\"\nca_file = {key:?}")),
            format!("{at}ca_file` = `"),
        ),
        (
            with(&format!("protocol = \"ssl\"\ncert_file = {ca:?}")),
            format!("{at}key_file` = `absent`"),
        ),
        (
            with(&format!(
                "protocol = \"ssl\"\ncert_file = {ca:?}\nkey_file = {other_key:?}"
            )),
            format!("{at}key_file` = `"),
        ),
        (
            VALID.replace(
                "group_id = \"shardgate-orders\"",
                "group_id = \"shardgate-orders\"\n[route.source.properties]\n\"sasl.password\" = \"inline\"",
            ),
            "`route[0].source.properties.sasl.password` = `sasl.password`".to_string(),
        ),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(&starts), "{starts}: {message}");
        assert!(
            !message.contains("k4fka-Secret") && !message.contains("inline"),
            "{message}"
        );
    }
}

/// NATS `security`: TLS files and one login, read and checked at `check`; the dead letter
/// inherits it with the URL; every mistake names its key; `Debug` never shows a secret.
#[test]
fn nats_security_keys_name_their_key() {
    let scratch = Scratch::new("nats-security");
    let dir = &scratch.dir;
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let ca = write("ca.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let seed_file = write("user.nk", format!("{seed}\n"));
    let not_a_seed = write("bad.nk", "SUnot-a-seed\n".to_string());
    let password = write("password", "n4ts-Secret\n".to_string());
    let route = |security: &str| {
        format!(
            "[cluster]\ncontact_points = [\"127.0.0.1:9042\"]\n[[route]]\nname = \"r\"\ntable = \"ks.t\"\n\
             [route.source]\nkind = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nstream = \"S\"\ndurable = \"d\"\n\
             [route.source.security]\n{security}\n[route.columns]\nid = \"id\"\n[route.dead_letter]\nkind = \"nats\"\nsubject = \"dl\"\n"
        )
    };
    let config = Config::parse(
        &route(&format!("ca_file = {ca:?}\nnkey_seed_file = {seed_file:?}")),
        "t",
    )
    .expect("valid");
    let SourceConfig::JetStream(js) = &config.routes[0].source else {
        panic!("a JetStream source");
    };
    let security = js.security.as_ref().expect("security");
    assert!(security.require_tls, "a CA implies TLS");
    assert_eq!(security.login, Some(crate::config::NatsLogin::NKey(seed.clone())));
    let DeadLetterConfig::Nats {
        security: inherited, ..
    } = &config.routes[0].dead_letter
    else {
        panic!("a NATS dead letter");
    };
    assert_eq!(inherited.as_ref(), Some(security));
    let shown = format!("{:?}", config.routes);
    assert!(!shown.contains(seed.as_str()), "{shown}");
    let with_password =
        Config::parse(&route(&format!("username = \"sg\"\npassword_file = {password:?}")), "t").expect("valid");
    assert!(!format!("{:?}", with_password.routes).contains("n4ts-Secret"));
    Config::parse(&route(&format!("cert_file = {ca:?}\nkey_file = {key:?}")), "t").expect("a client certificate");

    let at = "`route[0].source.security.";
    for (text, starts) in [
        (
            route(&format!("nkey_seed_file = {not_a_seed:?}")),
            "nkey_seed_file` = `",
        ),
        (
            route(&format!("token_file = {:?}", dir.join("missing"))),
            "token_file` = `",
        ),
        (
            route(&format!("nkey_seed_file = {seed_file:?}\ntoken_file = {password:?}")),
            "nkey_seed_file` = `given`",
        ),
        (route("username = \"sg\""), "password_file` = `absent`"),
        (route(&format!("password_file = {password:?}")), "username` = `absent`"),
        (route(&format!("creds_file = {password:?}")), "creds_file` = `"),
        (route(&format!("ca_file = {key:?}")), "ca_file` = `"),
        (route(&format!("cert_file = {ca:?}")), "key_file` = `absent`"),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(&format!("{at}{starts}")), "{starts}: {message}");
        assert!(
            !message.contains("n4ts-Secret") && !message.contains(seed.as_str()),
            "{message}"
        );
    }
    let inline = error_of(&route("").replace("nats://127.0.0.1", "nats://sg:inl1ne@127.0.0.1"));
    assert!(
        inline.starts_with("`route[0].source.url` = `(a URL with credentials)`"),
        "{inline}"
    );
    assert!(!inline.contains("inl1ne"), "{inline}");
}

/// RabbitMQ `security`: the login from a file, TLS files only with `amqps://`; the dead letter
/// inherits it with the URL; every mistake names its key; `Debug` never shows the password.
#[test]
fn amqp_security_keys_name_their_key() {
    let scratch = Scratch::new("amqp-security");
    let dir = &scratch.dir;
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let ca = write("ca.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let password = write("password", "r4bbit-Secret\n".to_string());
    let route = |url: &str, security: &str| {
        format!(
            "[cluster]\ncontact_points = [\"127.0.0.1:9042\"]\n[[route]]\nname = \"r\"\ntable = \"ks.t\"\n\
             [route.source]\nkind = \"rabbitmq\"\nurl = \"{url}\"\nqueue = \"q\"\n\
             [route.source.security]\n{security}\n[route.columns]\nid = \"id\"\n\
             [route.dead_letter]\nkind = \"rabbitmq\"\nrouting_key = \"dl\"\n"
        )
    };
    let amqps = "amqps://127.0.0.1:5671/%2f";
    let login = format!("username = \"sg\"\npassword_file = {password:?}\n");
    let config = Config::parse(&route(amqps, &format!("{login}ca_file = {ca:?}")), "t").expect("valid");
    let SourceConfig::Amqp(amqp) = &config.routes[0].source else {
        panic!("a RabbitMQ source");
    };
    let security = amqp.security.as_ref().expect("security");
    assert_eq!(security.login, Some(("sg".to_string(), "r4bbit-Secret".to_string())));
    assert!(security.ca_pem.is_some());
    let DeadLetterConfig::Amqp {
        security: inherited, ..
    } = &config.routes[0].dead_letter
    else {
        panic!("a RabbitMQ dead letter");
    };
    assert_eq!(inherited.as_ref(), Some(security));
    assert!(!format!("{:?}", config.routes).contains("r4bbit-Secret"));
    Config::parse(&route(amqps, &format!("cert_file = {ca:?}\nkey_file = {key:?}")), "t")
        .expect("a client certificate");

    let at = "`route[0].source.security.";
    let plain = "amqp://127.0.0.1:5672/%2f";
    for (text, starts) in [
        (route(plain, &format!("ca_file = {ca:?}")), "ca_file` = `given`"),
        (route(amqps, "username = \"sg\""), "password_file` = `absent`"),
        (
            route(amqps, &format!("password_file = {password:?}")),
            "username` = `absent`",
        ),
        (
            route(
                amqps,
                &format!("username = \"sg\"\npassword_file = {:?}", dir.join("missing")),
            ),
            "password_file` = `",
        ),
        (route(amqps, &format!("ca_file = {key:?}")), "ca_file` = `"),
        (route(amqps, &format!("key_file = {key:?}")), "cert_file` = `absent`"),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(&format!("{at}{starts}")), "{starts}: {message}");
        assert!(!message.contains("r4bbit-Secret"), "{message}");
    }
}

/// `[ingest.auth]`: principals with a token hash or a certificate name and well-formed scopes
/// are accepted; every mistake is refused naming its key — and never the token.
#[test]
fn ingest_auth_keys_name_their_key() {
    let dir = std::env::temp_dir().join(format!("shardgate-auth-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = "tok-9f2c1e";
    let hash = crate::auth::token_sha256_hex(token);
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let other_file = dir.join("other");
    std::fs::write(&other_file, "not-a-principals-token").expect("token");
    let none = &VALID[..VALID.find("[[route]]").expect("route")];
    let with = |auth: &str| format!("{none}\n[ingest]\nlisten = \"127.0.0.1:50051\"\n{auth}\n");
    let principal = |extra: &str| {
        format!("[ingest.auth]\n[[ingest.auth.principal]]\nname = \"app\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"write:shop.*\", \"admin\"]\n{extra}")
    };
    let config = Config::parse(&with(&principal("")), "t").expect("valid auth");
    let auth = config.ingest.and_then(|i| i.auth).expect("auth");
    assert_eq!(
        auth.principals.by_token(token).map(|p| p.name.clone()),
        Some("app".into())
    );
    let with_token = with(&format!(
        "[ingest.auth]\nclient_token_file = {token_file:?}\n{}",
        &principal("")["[ingest.auth]\n".len()..]
    ));
    let config = Config::parse(&with_token, "t").expect("valid client token");
    assert_eq!(
        config.ingest.and_then(|i| i.auth).and_then(|a| a.client_token),
        Some(token.to_string())
    );
    for (text, starts) in [
        (with("[ingest.auth]\n"), "`ingest.auth.principal` = `[]`"),
        (
            with(&principal("").replace(&hash, "abc")),
            "`ingest.auth.principal[0].token_sha256` = `abc`",
        ),
        (
            with(&principal("").replace("admin", "root")),
            "`ingest.auth.principal[0].scopes[1]` = `root`",
        ),
        (
            with(&principal("").replace("write:shop.*", "write:shop")),
            "`ingest.auth.principal[0].scopes[0]` = `write:shop`",
        ),
        (
            with(&principal(
                "[[ingest.auth.principal]]\nname = \"app\"\ncertificate = \"x\"\nscopes = [\"admin\"]\n",
            )),
            "`ingest.auth.principal[1].name` = `app`",
        ),
        (
            with(&principal(
                "[[ingest.auth.principal]]\nname = \"cert\"\ncertificate = \"x\"\nscopes = [\"admin\"]\n",
            )),
            "`ingest.auth.principal[1].certificate` = `x`",
        ),
        (
            with(&principal(&format!(
                "[[ingest.auth.principal]]\nname = \"twin\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"admin\"]\n"
            ))),
            "`ingest.auth.principal[1].token_sha256`",
        ),
        (
            with(&principal(
                "[[ingest.auth.principal]]\nname = \"neither\"\nscopes = [\"admin\"]\n",
            )),
            "`ingest.auth.principal[1].token_sha256`",
        ),
        (
            with(&format!(
                "[ingest.auth]\nclient_token_file = {other_file:?}\n{}",
                &principal("")["[ingest.auth]\n".len()..]
            )),
            "`ingest.auth.client_token_file` = `",
        ),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
        assert!(
            !message.contains("not-a-principals-token"),
            "a token is echoed: {message}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[admin]`'s TLS files and token hash, `[ingest.auth.jwt]` and a ZeroMQ route's CURVE keys
/// are read and checked as start-up would; every bad one is named, no secret key echoed.
#[test]
fn admin_jwt_and_zeromq_security_keys_name_their_key() {
    let scratch = Scratch::new("admin-jwt-zmq");
    let write = |name: &str, text: String| scratch.write(name, text);
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let cert = write("cert.pem", one.cert.pem());
    let key = write("key.pem", one.signing_key.serialize_pem());
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let other_key = write("other.pem", other.signing_key.serialize_pem());
    let hash = crate::auth::token_sha256_hex("t");
    let admin = |extra: &str| format!("{VALID}\n[admin]\nlisten = \"127.0.0.1:9190\"\n{extra}\n");
    let config = Config::parse(
        &admin(&format!(
            "cert_file = {cert:?}\nkey_file = {key:?}\ntoken_sha256 = \"{hash}\""
        )),
        "t",
    )
    .expect("valid");
    let parsed = config.admin.expect("admin");
    assert!(parsed.tls.is_some());
    assert_eq!(parsed.token_sha256, Some(crate::auth::token_sha256("t")));
    for (text, starts) in [
        (admin(&format!("cert_file = {cert:?}")), "`admin.key_file` = `absent`"),
        (admin(&format!("key_file = {key:?}")), "`admin.cert_file` = `absent`"),
        (
            admin(&format!("cert_file = {cert:?}\nkey_file = {other_key:?}")),
            "`admin.key_file` = `",
        ),
        (admin("token_sha256 = \"abc\""), "`admin.token_sha256` = `abc`"),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }

    let (_, jwk) = crate::auth::jwt::tests::es256_key("k1");
    let jwks = write("jwks.json", serde_json::json!({ "keys": [jwk] }).to_string());
    let oct = write("oct.json", r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.to_string());
    let ingest = |jwt: &str| {
        format!(
            "[cluster]\ncontact_points = [\"127.0.0.1:9042\"]\n[ingest]\nlisten = \"127.0.0.1:50051\"\n\
             [ingest.auth.jwt]\n{jwt}\n"
        )
    };
    let good = format!("jwks_file = {jwks:?}\nissuer = \"i\"\naudience = \"a\"");
    Config::parse(&ingest(&good), "t").expect("a JWKS without principals is enough");
    for (text, starts) in [
        (
            ingest(&format!("jwks_file = {oct:?}\nissuer = \"i\"\naudience = \"a\"")),
            "`ingest.auth.jwt.jwks_file` = `",
        ),
        (
            ingest(&format!("jwks_file = {cert:?}\nissuer = \"i\"\naudience = \"a\"")),
            "`ingest.auth.jwt.jwks_file` = `",
        ),
        (
            ingest(&format!("jwks_file = {jwks:?}\nissuer = \"\"\naudience = \"a\"")),
            "`ingest.auth.jwt.issuer` = ``",
        ),
        (
            ingest(&format!("{good}\nleeway_s = 301")),
            "`ingest.auth.jwt.leeway_s` = `301`",
        ),
    ] {
        let message = error_of(&text);
        assert!(message.starts_with(starts), "{starts}: {message}");
    }
    assert!(error_of(&ingest(&format!(
        "jwks_file = {oct:?}\nissuer = \"i\"\naudience = \"a\""
    )))
    .contains("keys[0]"));

    let pair = zmq::CurveKeyPair::new().expect("CURVE keys");
    let secret = crate::config::curve_key_text(&pair.secret_key);
    let secret_file = write("curve.secret", format!("{secret}\n"));
    let clients = write(
        "clients",
        format!("# loader\n\n{}\n", crate::config::curve_key_text(&pair.public_key)),
    );
    let zmq_route = |security: &str| {
        format!(
            "[cluster]\ncontact_points = [\"127.0.0.1:9042\"]\n[[route]]\nname = \"r\"\ntable = \"ks.t\"\n\
             [route.source]\nkind = \"zeromq\"\nsocket = \"pull\"\nendpoint = \"tcp://127.0.0.1:5557\"\nbind = true\n\
             [route.source.security]\n{security}\n[route.columns]\nid = \"id\"\n\
             [route.dead_letter]\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"dl\"\n"
        )
    };
    let config = Config::parse(
        &zmq_route(&format!(
            "curve_secret_key_file = {secret_file:?}\ncurve_client_keys_file = {clients:?}"
        )),
        "t",
    )
    .expect("valid");
    let SourceConfig::Zmq(zmq) = &config.routes[0].source else {
        panic!("a ZeroMQ source");
    };
    assert_eq!(
        zmq.security.as_ref().map(|s| s.client_keys.clone()),
        Some(vec![pair.public_key])
    );
    assert!(!format!("{:?}", config.routes).contains(&secret));
    let bad_line = write("bad-clients", "# loader\nnot-a-key\n".to_string());
    let empty = write("empty-clients", "# nobody yet\n".to_string());
    let short = write("short.secret", format!("{}\n", &secret[1..]));
    let at = "`route[0].source.security.";
    for (security, starts) in [
        (
            format!("curve_secret_key_file = {short:?}\ncurve_client_keys_file = {clients:?}"),
            "curve_secret_key_file` = `",
        ),
        (
            format!("curve_secret_key_file = {secret_file:?}\ncurve_client_keys_file = {bad_line:?}"),
            "curve_client_keys_file` = `",
        ),
        (
            format!("curve_secret_key_file = {secret_file:?}\ncurve_client_keys_file = {empty:?}"),
            "curve_client_keys_file` = `",
        ),
        (
            format!("curve_secret_key_file = {secret_file:?}"),
            "curve_client_keys_file",
        ),
    ] {
        let message = error_of(&zmq_route(&security));
        assert!(message.contains(starts), "{starts}: {message}");
        assert!(
            message.starts_with(at) || message.contains("curve_client_keys_file"),
            "{message}"
        );
        assert!(!message.contains(&secret[1..]), "the secret key is echoed: {message}");
    }
    assert!(error_of(&zmq_route(&format!(
        "curve_secret_key_file = {secret_file:?}\ncurve_client_keys_file = {bad_line:?}"
    )))
    .contains("line 2"));
}
