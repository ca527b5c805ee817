#!/usr/bin/env bash
# Installs what twopc needs and is missing: Debian packages (PostgreSQL, ActiveMQ,
# a Java runtime with keytool, Chromium for the report's browser test) and a virtual environment (.venv) with the project, its
# development tools and the bench extra in it.
# Idempotent: a second run installs nothing and takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null \
  || need_packages+=(postgresql)
[ -e /usr/share/activemq/bin/activemq.jar ] || need_packages+=(activemq)
# The JDK's keytool makes the broker's TLS certificate; the headless runtime has it.
{ command -v java >/dev/null && command -v keytool >/dev/null; } \
  || need_packages+=(default-jre-headless)
# The report test opens report.html in headless Chromium.
{ command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } \
  || need_packages+=(chromium)

if [ ${#need_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${need_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own services are not wanted: the lab runs private instances.
    apt-get install -y -q --no-install-recommends "${need_packages[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${need_packages[*]}" >&2
    echo "setup: install them with: sudo apt-get install -y ${need_packages[*]}" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: twopc needs Python 3.11 or newer; $("$python" --version) found (set PYTHON=...)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.twopc-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing twopc and its dependencies into .venv"
  # The versions the project is tested with: constraints.txt (README: "Dependencies").
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e '.[cli,binary,dev,bench,metrics,tracing,pool]'
  echo "$want" > "$stamp"
fi
