"""The state table: allowed moves pass, others are refused; `expect` catches a record moved by someone else."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from modelctl.failures import Exit, Failure
from modelctl.host.identity import ProcessIdentity
from modelctl.spec import RestartPolicy
from modelctl.state import lifecycle as lc
from modelctl.state.record import Instance, ServerRecord
from modelctl.state.restart import Backoff


@pytest.mark.parametrize(
    "src, dst",
    [
        (lc.STOPPED, lc.STARTING),
        (lc.STARTING, lc.READY),
        (lc.READY, lc.UNHEALTHY),
        (lc.UNHEALTHY, lc.READY),
        (lc.READY, lc.CRASHED),
        (lc.CRASHED, lc.BACKOFF),
        (lc.BACKOFF, lc.STARTING),
        (lc.CRASHED, lc.FAILED),
        (lc.FAILED, lc.STOPPED),
        (lc.READY, lc.STOPPING),
        (lc.CRASHED, lc.STOPPING),
        (lc.STOPPING, lc.STOPPED),
    ],
)
def test_allowed_moves(src, dst):
    rec = ServerRecord(profile="p", name="s", state=src)
    lc.move(rec, dst)
    assert rec.state == dst


@pytest.mark.parametrize(
    "src, dst",
    [
        (lc.STOPPED, lc.READY),
        (lc.FAILED, lc.READY),
        (lc.FAILED, lc.STARTING),
        (lc.STOPPING, lc.STARTING),
        (lc.BACKOFF, lc.READY),
        (lc.STARTING, lc.BACKOFF),
        (lc.READY, lc.STOPPED),
    ],
)
def test_refused_moves(src, dst):
    rec = ServerRecord(profile="p", name="s", state=src)
    with pytest.raises(lc.TransitionError):
        lc.move(rec, dst)
    assert rec.state == src


def test_a_move_from_an_unexpected_state_is_refused_even_if_the_table_allows_it():
    rec = ServerRecord(profile="p", name="s", state=lc.UNHEALTHY)
    with pytest.raises(lc.TransitionError, match="is unhealthy, expected ready"):
        lc.move(rec, lc.STOPPING, expect=lc.READY)
    assert rec.state == lc.UNHEALTHY


def test_force_moves_outside_the_table():
    rec = ServerRecord(profile="p", name="s", state=lc.READY)
    lc.force(rec, lc.FAILED, "its spec no longer validates")
    assert rec.state == lc.FAILED


OWNED_PARTS = frozenset({"state", "instance", "successor", "history", "wish", "usage"})
# methods that change a list, dict or set in place
MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault", "add", "discard", "sort", "reverse"})


def _touches_owned(node: ast.AST) -> bool:
    """Whether the chain goes through a record's part. A supervisor slot's own `successor` (the
    runtime of an instance that is starting) is not one: a part right after a name or attribute
    that ends in `slot` is the slot's."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        inner = node.value
        if isinstance(node, ast.Attribute) and node.attr in OWNED_PARTS and not _is_slot(inner):
            return True
        node = inner
    return False


def _is_slot(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.endswith("slot")


def _is_setattr(func: ast.AST) -> bool:
    return (isinstance(func, ast.Name) and func.id == "setattr") or (isinstance(func, ast.Attribute) and func.attr == "__setattr__")


def owned_writes(source: str) -> list[tuple[int, str]]:
    """Every write of a record's state, instance, successor, history, wish or usage (or of a field
    or element inside them) in `source`: assignment of any kind, `del`, an in-place method
    (`.append(`, `.update(`, ...), and `setattr` / `object.__setattr__`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        targets: Sequence[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in MUTATORS and _touches_owned(func.value):
                found.append((node.lineno, ast.unparse(node)))
            elif _is_setattr(func) and len(node.args) >= 2:
                obj, name = node.args[0], node.args[1]
                named_part = not isinstance(name, ast.Constant) or name.value in OWNED_PARTS  # a computed name may be one
                if named_part or _touches_owned(obj):
                    found.append((node.lineno, ast.unparse(node)))
        for target in targets:
            elements = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            for el in elements:
                if isinstance(el, ast.Starred):
                    el = el.value
                if isinstance(el, (ast.Attribute, ast.Subscript)) and _touches_owned(el):
                    found.append((getattr(node, "lineno", 0), ast.unparse(node).splitlines()[0]))
    return found


def test_no_state_instance_history_or_wish_is_written_outside_the_lifecycle_module():
    """Every change of a record's state, instance, history or wish is a named transition there.
    Fails if `rec.history.restarts += 1` (or `.append(`, `setattr`, an annotated assignment) is
    written anywhere in modelctl but modelctl/state/lifecycle.py."""
    root = Path(lc.__file__).parent.parent
    offenders = [
        f"{path.relative_to(root.parent)}:{n}: {text}"
        for path in sorted(root.rglob("*.py"))
        if path != Path(lc.__file__)
        for n, text in owned_writes(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "line",
    [
        "rec.instance = None",
        "rec.history.restarts = 3",
        "r.wish.desired = 'stopped'",
        "rec.state = x",
        "rec.history.restarts += 1",
        "rec.history.exits.append(entry)",
        "rec.instance.members.extend(more)",
        "setattr(rec, 'state', 'ready')",
        "setattr(rec.history, 'restarts', 2)",
        "object.__setattr__(rec.usage, 'peak_rss', 1)",
        "rec.state: str = 'ready'",
        "rec.state, port = 'ready', 1",
        "del rec.instance",
        "rec.usage.gpu[0] = 1",
        "slot.rec.history.failures.clear()",
        "slot.rec.successor = None",
    ],
)
def test_the_ownership_check_sees_every_kind_of_write(line):
    assert owned_writes(line), line


@pytest.mark.parametrize(
    "line",
    [
        "if rec.state == x: pass",
        "state = rec.state",
        "n = len(rec.history.exits)",
        "f(rec.wish)",
        "names.append(rec.state)",
        "slot.successor = runtime",  # the slot's runtime of a starting instance, not the record's successor
    ],
)
def test_the_ownership_check_lets_reads_pass(line):
    assert owned_writes(line) == [], line


def test_a_start_then_a_crash_then_a_backoff_set_their_fields_together():
    rec = ServerRecord(profile="p", name="s", fingerprint="f1")
    lc.intend_start(rec, "token-1", now=10.0)
    assert rec.state == lc.STARTING and rec.instance.token == "token-1" and rec.instance.fingerprint == "f1"
    lc.spawned(rec, ProcessIdentity(123, 5.0))
    lc.became_ready(rec, 12.0, {"total": 2.0})
    assert rec.instance.ready_at == 12.0 and rec.startup == {"total": 2.0}
    lc.crashed(rec, 20.0, Exit(signal=9), Failure("signal", "killed by SIGKILL", True), RestartPolicy())
    assert rec.state == lc.CRASHED and rec.history.last_exit == Exit(signal=9) and rec.history.failures == [20.0]
    lc.settle_crash(rec, Backoff(2.0, "killed by SIGKILL; restarting in 2s"), 21.0)
    assert rec.state == lc.BACKOFF and rec.instance is None and rec.history.next_start_at == 23.0
    lc.intend_start(rec, "token-2", now=23.0)
    assert rec.history.restarts == 1 and rec.history.next_start_at is None and rec.instance.token == "token-2"


def test_a_version_2_record_is_read_into_its_parts():
    old = {
        "version": 2, "profile": "p", "name": "s", "state": "backoff", "desired": "running", "managed_by": "systemd",
        "pid": 42, "create_time": 1.5, "instance": "tok", "members": [[43, 2.0]], "started_at": 9.0, "running_fingerprint": "f0",
        "restarts": 2, "failures": [8.0], "consecutive_failures": 2, "next_start_at": 11.0, "last_exit": "killed by SIGKILL",
        "last_error": "signal: killed by SIGKILL", "exits": [{"at": 8.0, "exit": "exit code 3", "class": "crash", "line": "boom", "retry": True}],
    }  # fmt: skip
    rec = ServerRecord.from_json(old)
    assert rec.version == 3 and rec.wish.managed_by == "systemd" and rec.wish.desired == "running"
    assert (
        rec.instance.token == "tok" and rec.instance.pid == 42 and rec.instance.members == [[43, 2.0]] and rec.instance.fingerprint == "f0"
    )
    assert rec.history.restarts == 2 and rec.history.last_exit == Exit(signal=9) and rec.history.next_start_at == 11.0
    assert rec.history.exits[0].exit == Exit(code=3) and rec.history.exits[0].cls == "crash"
    assert ServerRecord.from_json(rec.to_json()) == rec  # and written back as version 3


# ---------------------------------------------------------------------- what each transition sets (mutants that survived)
def running(state: lc.State = lc.READY, token: str = "tok") -> ServerRecord:
    rec = ServerRecord(profile="p", name="s", state=state)
    rec.instance = Instance(token=token, fingerprint="f", started_at=1.0, pid=10, create_time=1.0, ready_at=2.0)
    return rec


def test_a_crashed_instance_is_no_longer_ready():
    """Fails if a crash keeps the instance's ready time (status would show an uptime for it)."""
    rec = running()
    lc.crashed(rec, 5.0, Exit(code=1), Failure("crash", "exit code 1", True), RestartPolicy())
    assert rec.state == lc.CRASHED and rec.instance is not None and rec.instance.ready_at is None


def test_a_start_that_spawns_nothing_is_failed_with_its_exit_kept():
    """Fails if a failed start leaves no entry in the exits that status shows."""
    rec = ServerRecord(profile="p", name="s")
    lc.intend_start(rec, "tok", now=1.0)
    lc.failed_to_start(rec, Failure("missing-executable", "cannot run 'x'", False), 2.0)
    assert rec.state == lc.FAILED and rec.instance is None
    assert [(e.cls, e.line) for e in rec.history.exits] == [("missing-executable", "cannot run 'x'")]


def test_the_end_of_another_instances_stop_changes_nothing():
    """Instance B is being stopped; the stop of instance A, begun earlier, ends now: the record
    stays B's. Fails if `stopped` does not check the instance's token."""
    rec = running(lc.STOPPING, token="B")
    assert lc.stopped(rec, "A") is False
    assert rec.state == lc.STOPPING and rec.instance is not None and rec.instance.token == "B"


def test_a_stopped_server_has_no_instance_and_no_successor():
    """Fails if a stop leaves the successor of a replacement in the record."""
    rec = running(lc.STOPPING)
    rec.successor = Instance(token="next", fingerprint="f", started_at=3.0)
    assert lc.stopped(rec, "tok") is True
    assert rec.state == lc.STOPPED and rec.instance is None and rec.successor is None


def test_a_stop_during_a_backoff_cancels_the_next_start():
    """Fails if `begin_stop` keeps the backoff's due time (the supervisor would start it again)."""
    rec = ServerRecord(profile="p", name="s", state=lc.BACKOFF)
    rec.history = dataclasses.replace(rec.history, next_start_at=9.0)
    lc.begin_stop(rec, None, "stopped")
    assert rec.state == lc.STOPPED and rec.history.next_start_at is None and rec.wish.desired == "stopped"


def test_the_largest_measurement_is_the_peak():
    """Fails if the last measurement replaces a larger peak (the budget would undercount)."""
    rec = running()
    lc.measured(rec, rss=300, gpu=None)
    lc.measured(rec, rss=200, gpu=None)
    assert rec.usage.peak_rss == 300


def test_up_forgets_the_failures_of_the_old_spec():
    """Fails if `wanted` keeps the failures that count towards a crash loop."""
    rec = ServerRecord(profile="p", name="s", state=lc.BACKOFF)
    rec.history = dataclasses.replace(rec.history, failures=[1.0, 2.0], consecutive_failures=2, next_start_at=9.0)
    lc.wanted(rec, lc.SUPERVISOR)
    assert rec.history.failures == [] and rec.history.consecutive_failures == 0 and rec.history.next_start_at is None


def test_a_successor_that_takes_over_is_the_instance_and_the_old_one_is_returned_to_stop():
    """Fails if the record keeps the old instance once the successor took over."""
    rec = running(token="old")
    rec.successor = Instance(token="new", fingerprint="f", started_at=3.0, pid=11, create_time=3.0)
    old = lc.successor_took_over(rec, 4.0)
    assert old.token == "old" and rec.instance is not None and rec.instance.token == "new" and rec.instance.ready_at == 4.0
    assert rec.successor is None


def test_a_failed_successor_is_remembered_so_that_its_spec_is_not_tried_again():
    """Fails if a failed replacement is not recorded (the supervisor would start it again and again)."""
    rec = running()
    rec.fingerprint = "f2"
    rec.successor = Instance(token="new", fingerprint="f2", started_at=3.0)
    lc.successor_failed(rec, Failure("crash", "exit code 1", True), Exit(code=1), 4.0)
    assert rec.successor is None and rec.instance is not None and rec.instance.token == "tok"
    failed = rec.history.failed_replacement
    assert failed is not None and failed.fingerprint == "f2" and failed.generation == rec.wish.generation
