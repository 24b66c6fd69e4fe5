"""The storage contract: every Optuna storage a sweep takes (a journal file, SQLite, PostgreSQL)
claims exactly the budget however processes interleave, recovers a dead worker's trial once,
fails a trial once, and holds the study's locks (the budget's; the models' that register and gc
share). No training. PostgreSQL is a real server (``tests.test_hosts.postgres``), in the slow tier."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifar_exp.sweep import recovery, storage
from cifar_exp.sweep.storage import Claim, claim, create_study, open_storage
from tests.test_hosts import postgres  # noqa: F401  (the fixture, for the postgresql kind)
from tests.test_study import dead_pid, settings


@pytest.fixture(params=["journal", "sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty storage of each kind."""
    if request.param == "journal":
        return str(tmp_path / "o.journal")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/o.db"
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"contract_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def _claim_all(url: str, found: list) -> None:
    own = settings(url)
    handle = open_storage(url)
    while (claimed := claim(own, handle)) not in ("done", "wait"):
        assert isinstance(claimed, Claim)
        time.sleep(0.05)
        claimed.study.tell(claimed.trial, 0.5)
    found.append(claimed)


def test_four_processes_claiming_at_once_run_exactly_the_budget(url: str) -> None:
    create_study(settings(url))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:  # spawned too: forking after JAX started its threads can deadlock
        found = manager.list()
        processes = [ctx.Process(target=_claim_all, args=(url, found)) for _ in range(4)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(120)
            assert p.exitcode == 0
        assert set(found) <= {"done", "wait"}
    trials = optuna.load_study(study_name="lr_dropout", storage=open_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # three, however the claims interleaved
    assert len({t.number for t in trials}) == 3


def test_a_dead_workers_trial_is_failed_once_and_retried_once_with_its_params(url: str) -> None:
    own = settings(url)
    create_study(own)
    claimed = claim(own, open_storage(url))
    assert isinstance(claimed, Claim)
    study, params = claimed.study, claimed.params
    assert recovery.recover_stale(study) == []  # its worker (this process) lives
    claimed.trial.set_user_attr("worker_pid", dead_pid())
    (stale,) = recovery.recover_stale(study)
    assert stale.number == 0 and recovery.recover_stale(study) == []  # once
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and "is gone" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"retry_of": 0}
    again = claim(own, open_storage(url))
    assert isinstance(again, Claim) and again.trial.number == 1 and again.params == params


def test_a_trial_is_failed_once_with_its_reason(url: str) -> None:
    own = settings(url)
    create_study(own)
    claimed = claim(own, open_storage(url))
    assert isinstance(claimed, Claim)
    assert recovery.fail_in_study(claimed.study, claimed.trial, "ValueError: x")
    assert not recovery.fail_in_study(claimed.study, claimed.trial, "another reason")  # ended already
    (trial,) = claimed.study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "ValueError: x"


def test_the_models_lock_is_shared_by_registers_exclusive_for_gc_and_apart_from_the_budget(url: str) -> None:
    own = settings(url)
    study = create_study(own)
    other = open_storage(url)  # another process's connection, as far as the database is concerned
    with storage.models_lock(url, study, "lr_dropout", shared=True) as held:
        assert held
        with storage.models_lock(url, other, "lr_dropout", shared=True, wait=False) as second:
            assert second  # two registers at once
        with storage.models_lock(url, other, "lr_dropout", shared=False, wait=False) as gc:
            assert not gc  # gc waits for both
        assert isinstance(claim(own, other), Claim)  # claiming is not held up by a registration
    with storage.models_lock(url, other, "lr_dropout", shared=False, wait=False) as gc:
        assert gc
        with storage.models_lock(url, study, "lr_dropout", shared=True, wait=False) as register:
            assert not register  # a register waits for gc
    with storage.models_lock(url, study, "another_sweep", shared=False, wait=False) as elsewhere:
        assert elsewhere  # one lock per study


@pytest.mark.slow
def test_a_connection_the_server_dropped_is_replaced_before_the_next_claim(postgres: str) -> None:  # noqa: F811
    """An idle worker's connection, dropped by the server (as an idle timeout, a proxy or a NAT
    drops it), is tested and replaced before use: the next call goes through."""
    import psycopg

    url = f"{postgres}/optuna"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="idle")
    assert study.get_trials() == []  # a pooled connection, now idle
    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as admin:
        dropped = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'optuna' "
                                "AND pid <> pg_backend_pid()").fetchall()
    assert dropped and all(row[0] for row in dropped)
    assert study.get_trials() == []  # without pool_pre_ping: OperationalError, server closed the connection
    optuna.delete_study(study_name="idle", storage=storage)
