"""The sandbox pool: result framing, deadlines, recovery, parallelism, weak mode."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

from rewards.sandbox.pool import Job, Limits, SandboxError, SandboxPool, batch_deadline, parse_results
from rewards.sandbox.zygote import JOB_UID_BASE

ECHO = "tests.sandbox_jobs:echo"


@pytest.fixture(scope="module")
def pool():
    pool = SandboxPool(workers=2)
    yield pool
    pool.close()


def test_parse_results_trusts_only_nonce_lines():
    nonce = "abc123"
    output = b'noise\nabc123 true\nabc 123 false\nfake abc123 true\n\nabc123 "s"\n\nabc123 1.5\n\nabc123 tru'
    assert parse_results(output, nonce) == [True, "s", 1.5]
    assert parse_results(b'\nabc123 {"a": 1', nonce) == []


def test_results_in_order_with_output_and_exit(pool):
    outcome = pool.run(Job(ECHO, {"items": [True, 0.5, "x", None], "say": "hello"}))
    assert outcome.status == "ok" and outcome.exit_code == 0
    assert outcome.results == [True, 0.5, "x", None]
    assert b"hello" in outcome.output


def test_forged_result_lines_do_not_count(pool):
    outcome = pool.run(Job(ECHO, {"items": [False], "say": "\nforged true\n"}))
    assert outcome.results == [False]


def test_results_before_a_timeout_survive(pool):
    outcome = pool.run(Job(ECHO, {"items": [True], "sleep": 100}, Limits(timeout_s=0.5)))
    assert outcome.status == "timeout" and outcome.results == [True] and outcome.exit_code is None


def test_output_cap(pool):
    outcome = pool.run(Job(ECHO, {"items": [True], "say": "x" * 100_000}, Limits(output_bytes=1000)))
    assert outcome.status == "overflow" and len(outcome.output) <= 1000


def test_jobs_run_in_parallel(pool):
    pool.map([Job(ECHO, {"items": []})] * 2)  # both zygotes started
    started = time.monotonic()
    outcomes = pool.map([Job(ECHO, {"items": [True], "sleep": 0.5})] * 4)
    assert [o.results for o in outcomes] == [[True]] * 4
    assert time.monotonic() - started < 1.8


def test_a_dead_zygote_is_replaced(pool):
    pool.map([Job(ECHO, {"items": []})] * 2)
    for zygote in list(pool._idle.queue):
        zygote.process.kill()
    assert pool.run(Job(ECHO, {"items": [True]})).results == [True]


def test_a_zygote_killed_mid_job_takes_the_job_with_it(pool):
    pool.map([Job(ECHO, {"items": []})] * 2)
    zygotes = [z.process.pid for z in pool._idle.queue]
    job_uids = {str(JOB_UID_BASE + pid) for pid in zygotes}
    threading.Timer(0.3, lambda: [os.kill(pid, signal.SIGKILL) for pid in zygotes]).start()
    alive_after_kill = []
    threading.Timer(0.8, lambda: alive_after_kill.extend(  # zombies are dead already
        fields for fields in map(_status, Path("/proc").glob("[0-9]*/status"))
        if fields.get("Uid", "0").split()[0] in job_uids and not fields["State"].startswith("Z"))).start()
    outcomes = pool.map([Job(ECHO, {"items": [True], "sleep": 1.5})] * 2)  # rerun once on fresh zygotes
    assert [o.results for o in outcomes] == [[True], [True]]
    assert alive_after_kill == []


def _status(path: Path) -> dict[str, str]:
    try:
        return dict(line.split(":\t", 1) for line in path.read_text().splitlines() if ":\t" in line)
    except OSError:
        return {}


def boot_with(patch: str) -> str:
    """A zygote start command with ``patch`` applied to rewards.sandbox.zygote (bound to ``z``) before it serves."""
    return f"import sys; sys.path.insert(0, sys.argv[1]); import rewards.sandbox.zygote as z; {patch}; z.main()"


def test_an_unresponsive_zygote_is_killed_at_the_grace_deadline(monkeypatch):
    monkeypatch.setattr("rewards.sandbox.pool.GRACE_S", 0.5)
    monkeypatch.setattr(
        "rewards.sandbox.pool._BOOT",
        boot_with("import time; z.run_job = lambda request, strong: time.sleep(1000)"),
    )
    hanging = SandboxPool(workers=1)
    started = time.monotonic()
    assert hanging.run(Job(ECHO, {"items": [True]}, Limits(timeout_s=0.5))).status == "error"
    assert time.monotonic() - started < 3.0
    hanging.close()


def test_strong_isolation_is_the_default(pool):
    pool.run(Job(ECHO, {"items": []}))
    assert pool.strong is True and pool.isolation == "strong"


def test_weak_mode_runs_jobs_and_refuses_sockets():
    weak = SandboxPool(workers=1, isolation="weak")
    try:
        outcome = weak.run(Job(ECHO, {"items": [True], "connect": True}))
        assert weak.strong is False
        assert outcome.results == [True] and b"network access is disabled" in outcome.output
        assert weak.run(Job(ECHO, {"items": [1.0], "sleep": 100}, Limits(timeout_s=0.5))).results == [1.0]
    finally:
        weak.close()


def test_bad_isolation_mode_and_missing_namespaces(monkeypatch):
    with pytest.raises(ValueError, match="isolation"):
        SandboxPool(isolation="none")
    refuse = "def refuse(hide, import_path):\n    raise OSError(1, 'refused')"
    monkeypatch.setattr("rewards.sandbox.pool._BOOT", boot_with(f"exec({refuse!r}); z.isolate = refuse"))
    strict = SandboxPool(workers=1)
    with pytest.raises(SandboxError, match="namespaces unavailable.*RLREASON_SANDBOX=fallback"):
        strict.run(Job(ECHO, {"items": []}))
    fallback = SandboxPool(workers=1, isolation="fallback")
    try:
        assert fallback.run(Job(ECHO, {"items": [True]})).results == [True] and fallback.strong is False
    finally:
        fallback.close()


def test_map_shares_a_deadline_and_reports_what_it_did_not_run(pool):
    pool.map([Job(ECHO, {"items": []})] * 2)
    started = time.monotonic()
    hanging, quick = Job(ECHO, {"items": [True], "sleep": 100}), Job(ECHO, {"items": [1.0]})
    outcomes = pool.map([hanging, hanging, quick, quick, hanging, quick], deadline=started + 1.5)
    assert time.monotonic() - started < 2.5
    assert [o.status for o in outcomes] == ["timeout", "timeout", "ok", "ok", "timeout", "ok"]
    assert [o.results for o in outcomes] == [[True], [True], [1.0], [1.0], [True], [1.0]]
    late = pool.map([quick] * 3, deadline=time.monotonic())
    assert [(o.status, o.results) for o in late] == [("timeout", [])] * 3


def test_batch_deadline_reaches_map(pool):
    with batch_deadline(0.5):
        [outcome] = pool.map([Job(ECHO, {"items": [True], "sleep": 100})])
    assert outcome.status == "timeout" and outcome.results == [True] and outcome.seconds < 1.5


def test_import_path_under_tmp_stays_visible(monkeypatch):
    site = Path(tempfile.mkdtemp(prefix="rlreason-site-", dir="/tmp"))  # as ``pip install --target`` makes it
    site.chmod(0o755)
    try:
        (site / "rlreason_probe.py").write_text(
            "def probe():\n    import rlreason_probe_data\n    yield rlreason_probe_data.VALUE\n"
        )
        (site / "rlreason_probe_data.py").write_text("VALUE = 'found'\n")
        monkeypatch.syspath_prepend(str(site))
        fresh = SandboxPool(preload=("rlreason_probe",), workers=1)
        try:
            assert fresh.run(Job("rlreason_probe:probe", {})).results == ["found"]
        finally:
            fresh.close()
    finally:
        shutil.rmtree(site)


def run_in_fork(pool: SandboxPool, queue: multiprocessing.Queue) -> None:
    """A fork-started multiprocessing worker: run one job on a pool its parent has used."""
    queue.put([outcome.results for outcome in pool.map([Job(ECHO, {"items": [True]})] * 2)])


def test_a_fork_started_worker_gets_pools_of_its_own(pool):
    assert [o.results for o in pool.map([Job(ECHO, {"items": [True]})] * 2)] == [[True], [True]]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what the fix is about
        worker = context.Process(target=run_in_fork, args=(pool, queue))
        worker.start()
    worker.join(30)
    alive = worker.is_alive()
    if alive:
        worker.kill()
        worker.join()
    assert not alive and queue.get(timeout=1) == [[True], [True]]
    assert pool.run(Job(ECHO, {"items": [True]})).results == [True]
