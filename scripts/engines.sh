# shellcheck shell=bash
# The real engines of the tests and benches, started on free ports: sourced (from the
# repository root) by scripts/test and bench/scaleout/run, so both start them one way.
# The caller keeps an array `cleanups` of commands that its EXIT trap evals; each start
# function appends the stop of what it started.
#   start_seaweedfs  SeaweedFS `weed mini` from .venv (bucket hookbridge-test, keys
#                    hookbridge-test / hookbridge-test-secret); exports
#                    HOOKBRIDGE_TEST_S3_ENDPOINT; its pid is in $weed_pid.
#   start_postgres   PostgreSQL 15 from Debian's packages (installed when missing), a fresh
#                    cluster with trust auth; exports HOOKBRIDGE_TEST_PG_URL (an admin URL);
#                    its data directory is $pg_dir/data.

# One real S3 server (SeaweedFS `weed mini`), on free ports.
start_seaweedfs() {
  weed_dir=$(mktemp -d)
  read -r s3 s3g m mg v vg f fg a ag < <(.venv/bin/python - <<'PY'
import socket
socks = [socket.socket() for _ in range(10)]
for i, s in enumerate(socks):
    while True:
        s.bind(("127.0.0.1", 0))
        # weed's plugin worker dials the admin port (the 9th) + 10000: keep it a valid port.
        if i != 8 or s.getsockname()[1] < 55536:
            break
        s.close()
        socks[i] = s = socket.socket()
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
  AWS_ACCESS_KEY_ID=hookbridge-test AWS_SECRET_ACCESS_KEY=hookbridge-test-secret \
    .venv/bin/weed mini -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket=hookbridge-test \
    -s3.port="$s3" -s3.port.grpc="$s3g" -master.port="$m" -master.port.grpc="$mg" \
    -volume.port="$v" -volume.port.grpc="$vg" -filer.port="$f" -filer.port.grpc="$fg" \
    -admin.port="$a" -admin.port.grpc="$ag" -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -s3.autoCreateBucket=false >"$weed_dir/weed.log" 2>&1 &
  weed_pid=$!
  cleanups+=('kill "$weed_pid" 2>/dev/null; wait "$weed_pid" 2>/dev/null; rm -rf "$weed_dir"')
  export HOOKBRIDGE_TEST_S3_ENDPOINT="http://127.0.0.1:$s3"
}

# One real PostgreSQL 15 (Debian's packages), on a free port.
start_postgres() {
  pg_bin=/usr/lib/postgresql/15/bin
  if [ ! -x "$pg_bin/initdb" ]; then
    echo "scripts/engines.sh: installing postgresql-15" >&2
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
  fi
  pg_dir=$(mktemp -d)
  chmod 755 "$pg_dir"
  # initdb refuses root: as root the cluster belongs to the `postgres` user.
  as_pg=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$pg_dir"
    as_pg=(runuser -u postgres --)
  fi
  pg_port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust >"$pg_dir/initdb.log" 2>&1
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c max_connections=300" start >/dev/null
  cleanups+=('"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1; rm -rf "$pg_dir"')
  export HOOKBRIDGE_TEST_PG_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
}
