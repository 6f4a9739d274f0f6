"""The receipt ledger over each store (SQLite and PostgreSQL): ingest rules, proofs,
export, and two ledgers sharing one database as two control-plane replicas do."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence

import pytest
from contract_helpers import grant_lease, lease_signer, same_database

from tether.control.ledger import Ledger
from tether.core.clock import FakeClock
from tether.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    NotOwner,
    VerificationError,
)
from tether.core.leases import Lease
from tether.core.receipts import Receipt, ReceiptKind
from tether.crypto import merkle
from tether.crypto.certs import issue_cert
from tether.crypto.leases import decode_lease
from tether.crypto.note import verify_checkpoint
from tether.crypto.receipts import ReceiptChain
from tether.crypto.signing import Envelope
from tether.store.base import NodeRecord, Store, ToolCallPhase, ToolCallWrite
from tether.verify import verify_bundle
from tether.verify.builder import T0, seeded_key

CONTROL = seeded_key("ledger/control")
NODE_KEYS = {n: seeded_key(f"ledger/{n}") for n in ("n1", "n2")}


def _receipt(lease: Lease, i: int) -> Receipt:
    return Receipt(
        kind=ReceiptKind.TOOL_CALL,
        node_id="",
        task_id=lease.task_id,
        attempt=lease.attempt,
        fencing_token=lease.fencing_token,
        agent_id=lease.agent_id,
        lease_id=lease.lease_id,
        lease_issued_unix_ms=lease.issued_unix_ms,
        lease_expires_unix_ms=lease.expires_unix_ms,
        time_unix_ms=T0 + i,
        tool="t",
        status="ok",
    )


def _chain(node: str, leases: Sequence[Lease]) -> list[tuple[int, bytes]]:
    """The node's chain from seq 1: one receipt about each of `leases`, in order."""
    chain = ReceiptChain(node, NODE_KEYS[node])
    return [(i + 1, chain.sign(_receipt(lease, i))) for i, lease in enumerate(leases)]


async def _grant(store: Store, task_id: str, node: str) -> Lease:
    """Task `task_id`, created and leased to `node` through the store (signed by CONTROL)."""
    return await grant_lease(store, CONTROL, task_id, node, now=T0)


@pytest.fixture
async def nodes(store: Store) -> Store:
    """The store with nodes n1 and n2 enrolled under CONTROL."""
    for node, key in NODE_KEYS.items():
        _, env = issue_cert(CONTROL, node, key.public.raw, T0 - 1000)
        await store.put_node(NodeRecord(node, key.public.raw, env.to_json_bytes(), T0))
    return store


async def _ledger(store: Store) -> Ledger:
    ledger = Ledger(store, CONTROL, FakeClock(T0 + 10_000), origin="test/ledger")
    await ledger.open()
    return ledger


async def test_a_carried_outcome_completes_the_started_record(nodes: Store) -> None:
    """A keyed tool_call receipt carrying its outcome completes the STARTED record its lease
    wrote, in the append (a lookup finds it); an outcome the receipt does not sign, or one on
    a receipt of no keyed call, is refused; a COMPLETED record is never overwritten."""
    lease = await _grant(nodes, "t1", "n1")
    args = "a" * 64

    def record(key: str, phase: ToolCallPhase, result: bytes = b"") -> ToolCallWrite:
        return ToolCallWrite(
            task_id="t1",
            fencing_token=lease.fencing_token,
            node_id="n1",
            idempotency_key=key,
            tool="t",
            arguments_sha256=args,
            phase=phase,
            result=result,
            status="ok" if result else "",
        )

    for key in ("k1", "k2"):
        await nodes.record_tool_call(record(key, ToolCallPhase.STARTED), T0 + 1)
    await nodes.record_tool_call(record("k2", ToolCallPhase.COMPLETED, b"first"), T0 + 2)
    chain = ReceiptChain("n1", NODE_KEYS["n1"])

    def call(i: int, key: str, result: bytes) -> bytes:
        receipt = dataclasses.replace(
            _receipt(lease, i),
            idempotency_key=key,
            arguments_sha256=args,
            result_sha256=hashlib.sha256(result).hexdigest(),
            cost_micros=7,
        )
        return chain.sign(receipt)

    ledger = await _ledger(nodes)
    first = call(0, "k1", b'{"n": 1}')
    with pytest.raises(InvalidArgument, match="result_sha256"):
        await ledger.ingest("n1", [(1, first)], {1: b'{"n": 2}'})
    started = await nodes.lookup_tool_call("t1", "k1")
    assert started is not None
    assert started.phase is ToolCallPhase.STARTED
    assert await ledger.ingest("n1", [(1, first)], {1: b'{"n": 1}'}) == (1, 0)
    done = await nodes.lookup_tool_call("t1", "k1")
    assert done is not None
    assert (done.phase, done.result, done.status, done.cost_micros) == (
        ToolCallPhase.COMPLETED,
        b'{"n": 1}',
        "ok",
        7,
    )
    assert done.fencing_token == lease.fencing_token
    plain = chain.sign(_receipt(lease, 1))  # no idempotency key
    with pytest.raises(InvalidArgument, match="keyed call"):
        await ledger.ingest("n1", [(2, plain)], {2: b""})
    assert await ledger.ingest("n1", [(2, plain)]) == (2, 1)
    assert await ledger.ingest("n1", [(3, call(2, "k2", b"second"))], {3: b"second"}) == (3, 2)
    kept = await nodes.lookup_tool_call("t1", "k2")
    assert kept is not None
    assert kept.result == b"first"


async def test_a_carried_outcome_never_completes_another_lease_s_record(nodes: Store) -> None:
    """n1 wrote STARTED for key k under token 1 and its lease lapsed; n2 (its own enrolled
    identity) holds token 2. n2's receipt carrying an outcome for k before it took k over,
    and n1's late receipt after n2 took it over, each sign the result they carry and are
    appended, but neither completes a record it did not start: only the holder's own does."""
    first = await _grant(nodes, "t1", "n1")
    args = "a" * 64

    def write(lease: Lease, node: str, **kw: object) -> ToolCallWrite:
        return ToolCallWrite(
            task_id="t1",
            fencing_token=lease.fencing_token,
            node_id=node,
            idempotency_key="k",
            tool="t",
            arguments_sha256=args,
            phase=ToolCallPhase.STARTED,
            **kw,  # type: ignore[arg-type]
        )

    await nodes.record_tool_call(write(first, "n1"), T0 + 1)
    await nodes.sweep_lapsed(now_ms=T0 + 60_000, backoff_base_ms=1, backoff_cap_ms=1)
    got = await nodes.acquire_lease(
        queue="queue-t1",
        node_id="n2",
        agent_id="a",
        lease_id="lease-t1-2",
        now_ms=T0 + 61_000,
        sign=lease_signer(CONTROL, T0 + 61_000),
    )
    assert got is not None
    second = decode_lease(Envelope.from_json_bytes(got[1]).payload)
    assert second.fencing_token > first.fencing_token
    chains = {n: ReceiptChain(n, NODE_KEYS[n]) for n in ("n1", "n2")}

    def call(node: str, lease: Lease, i: int, result: bytes) -> bytes:
        receipt = dataclasses.replace(
            _receipt(lease, i),
            time_unix_ms=lease.issued_unix_ms + i,
            idempotency_key="k",
            arguments_sha256=args,
            result_sha256=hashlib.sha256(result).hexdigest(),
        )
        return chains[node].sign(receipt)

    ledger = await _ledger(nodes)
    assert (await ledger.ingest("n2", [(1, call("n2", second, 1, b"n2"))], {1: b"n2"}))[0] == 1
    rec = await nodes.lookup_tool_call("t1", "k")
    assert rec is not None
    assert (rec.phase, rec.node_id, rec.fencing_token) == (
        ToolCallPhase.STARTED,
        "n1",
        first.fencing_token,
    )
    taken, _ = await nodes.record_tool_call(write(second, "n2", take_over=True), T0 + 61_001)
    assert (taken.phase, taken.fencing_token) == (ToolCallPhase.STARTED, second.fencing_token)
    assert (await ledger.ingest("n1", [(1, call("n1", first, 1, b"n1"))], {1: b"n1"}))[0] == 1
    rec = await nodes.lookup_tool_call("t1", "k")
    assert rec is not None
    assert (rec.phase, rec.node_id, rec.fencing_token) == (
        ToolCallPhase.STARTED,
        "n2",
        second.fencing_token,
    )
    assert (await ledger.ingest("n2", [(2, call("n2", second, 2, b"ok"))], {2: b"ok"}))[0] == 2
    rec = await nodes.lookup_tool_call("t1", "k")
    assert rec is not None
    assert (rec.phase, rec.result, rec.node_id) == (ToolCallPhase.COMPLETED, b"ok", "n2")


async def test_a_lease_gets_one_task_finished(nodes: Store) -> None:
    """A node signing a second, different task_finished for the lease it already ended
    (in a later batch or in the same one) is refused: the append-only ledger would hold
    two ends for the lease and its task's export would never verify again. An identical
    resend of the end is still acknowledged."""
    lease = await _grant(nodes, "t1", "n1")
    chain = ReceiptChain("n1", NODE_KEYS["n1"])

    def end(i: int) -> bytes:
        receipt = dataclasses.replace(
            _receipt(lease, i),
            kind=ReceiptKind.TASK_FINISHED,
            tool="",
            final_state=4,
        )
        return chain.sign(receipt)

    ledger = await _ledger(nodes)
    first = end(0)
    assert await ledger.ingest("n1", [(1, first)]) == (1, 0)
    assert await ledger.ingest("n1", [(1, first)]) == (1, 0)
    second = end(1)
    with pytest.raises(InvalidArgument, match="already ended"):
        await ledger.ingest("n1", [(2, second)])
    other = await _grant(nodes, "t2", "n2")
    chain = ReceiptChain("n2", NODE_KEYS["n2"])
    ends = [dataclasses.replace(_receipt(other, i), kind=ReceiptKind.TASK_FINISHED,
            tool="", final_state=4) for i in (0, 1)]  # fmt: skip
    with pytest.raises(InvalidArgument, match="already ended"):
        await ledger.ingest("n2", [(1, chain.sign(ends[0])), (2, chain.sign(ends[1]))])
    assert ledger.size == 1


async def test_ingest_dedupes_identical_resends(nodes: Store) -> None:
    """A replayed batch is acknowledged again without new leaves."""
    ledger = await _ledger(nodes)
    chain = _chain("n1", [await _grant(nodes, "task", "n1")] * 5)
    assert await ledger.ingest("n1", chain[:3]) == (3, 2)
    assert await ledger.ingest("n1", chain[:3]) == (3, 2)
    assert await ledger.ingest("n1", chain[1:]) == (5, 4)
    assert ledger.size == 5


async def test_ingest_refuses_forks_gaps_and_bad_signatures(nodes: Store) -> None:
    """Same seq with other bytes, a skipped seq, a foreign key or an unknown node are refused."""
    ledger = await _ledger(nodes)
    task, other, x = [await _grant(nodes, t, "n1") for t in ("task", "other", "x")]
    chain = _chain("n1", [task] * 4)
    await ledger.ingest("n1", chain[:2])
    with pytest.raises(AlreadyExists, match="fork"):
        await ledger.ingest("n1", _chain("n1", [other] * 2))
    with pytest.raises(InvalidArgument, match="gap"):
        await ledger.ingest("n1", chain[3:])
    with pytest.raises(InvalidArgument, match="prev"):
        await ledger.ingest("n1", _chain("n1", [x] * 3)[2:])
    with pytest.raises(VerificationError, match="not signed"):
        await ledger.ingest("n2", _chain("n1", [task]))
    with pytest.raises(VerificationError):
        await ledger.ingest("n1", [(3, chain[1][1])])
    with pytest.raises(NotFound):
        await ledger.ingest("n9", chain[:1])
    assert ledger.size == 2
    assert await ledger.ingest("n1", chain[2:]) == (4, 3)


async def test_ingest_refuses_receipts_about_tasks_never_leased_to_the_node(
    nodes: Store,
) -> None:
    """Receipts about another node's task or a made-up task are refused, appending nothing."""
    ledger = await _ledger(nodes)
    mine, theirs = await _grant(nodes, "mine", "n1"), await _grant(nodes, "theirs", "n2")
    made_up = dataclasses.replace(mine, lease_id="lease-ghost", task_id="ghost")  # no such task
    assert await ledger.ingest("n1", _chain("n1", [mine] * 2)) == (2, 1)
    size, root = ledger.size, (await ledger.checkpoint(fresh=True)).root_hash
    for bad in (theirs, made_up):
        chain = _chain("n1", [mine, mine, mine, bad])  # seq 3 is fine, seq 4 is not
        with pytest.raises(NotOwner, match=r"seq 4.*never leased to this node") as err:
            await ledger.ingest("n1", chain[2:])
        assert err.value.metadata == {"seq": "4"}
        assert ledger.size == size
    reopened = await _ledger(nodes)
    assert reopened.size == size
    assert (await reopened.checkpoint(fresh=True)).root_hash == root
    # n1's chain is untouched: it goes on from seq 2 as if nothing had been sent.
    assert await ledger.ingest("n1", _chain("n1", [mine] * 3)[2:]) == (3, 2)


async def test_proofs_checkpoints_and_restart(nodes: Store) -> None:
    """Checkpoints verify, proofs check against them, and a reopened ledger keeps its tree."""
    ledger = await _ledger(nodes)
    a = _chain("n1", [await _grant(nodes, "task-1", "n1")] * 6)
    b = _chain("n2", [await _grant(nodes, "task-2", "n2")] * 3)
    await ledger.ingest("n1", a[:3])
    first = await ledger.checkpoint(fresh=True)
    await ledger.ingest("n2", b)
    await ledger.ingest("n1", a[3:])
    cp = await ledger.checkpoint(fresh=True)
    body = verify_checkpoint(cp.note, [CONTROL.public])
    assert (body.tree_size, body.root_hash) == (9, cp.root_hash)
    size, proof = await ledger.inclusion_proof(4)
    assert size == 9
    assert merkle.verify_inclusion(merkle.leaf_hash(b[1][1]), 4, 9, proof, cp.root_hash)
    cons = await ledger.consistency_proof(first.tree_size, cp.tree_size)
    assert merkle.verify_consistency(3, 9, first.root_hash, cp.root_hash, cons)
    with pytest.raises(InvalidArgument):
        await ledger.inclusion_proof(9)
    again = await _ledger(nodes)
    assert again.size == 9
    assert (await again.checkpoint()).root_hash == cp.root_hash
    assert await again.ingest("n1", a) == (6, 8)


async def test_export_holds_full_chains_and_verifies(nodes: Store) -> None:
    """An exported bundle carries each node's whole chain and passes every ledger check."""
    ledger = await _ledger(nodes)
    await ledger.ingest("n1", _chain("n1", [await _grant(nodes, "t1", "n1")] * 4))
    await ledger.ingest("n2", _chain("n2", [await _grant(nodes, "t2", "n2")] * 2))
    bundle = await ledger.export(["t1"])
    assert len(bundle.entries) == 4
    assert len(bundle.node_certificates) == 1
    report = verify_bundle(bundle, [CONTROL.public])
    # The bundle carries the granted leases; only the task never finished (nor its lease):
    assert report.checks_failed() == {"task.final", "lease.closed"}
    assert len((await ledger.export()).entries) == 6
    assert len((await ledger.export(since_unix_ms=T0 + 10_001)).entries) == 0


async def test_two_ledgers_on_one_database_stay_one_tree(nodes: Store) -> None:
    """Two replicas' ledgers interleave appends, catch up, dedupe and refuse on stored state."""
    other = same_database(nodes)
    await other.open()
    try:
        a, b = await _ledger(nodes), await _ledger(other)
        task1, other1 = [await _grant(nodes, t, "n1") for t in ("task-1", "other")]
        task2 = await _grant(nodes, "task-2", "n2")
        n1, n2 = _chain("n1", [task1] * 9), _chain("n2", [task2] * 4)
        assert await a.ingest("n1", n1[:3]) == (3, 2)
        assert await b.ingest("n2", n2[:2]) == (2, 4)  # b's tree caught up on a's leaves
        assert b.size == 5
        assert await a.ingest("n1", n1[3:5]) == (5, 6)
        # b never saw n1: its head comes from the database; 1..5 dedupe, 6 is new.
        assert await b.ingest("n1", n1[:6]) == (6, 7)
        # a's cached head for n1 (seq 5) is stale: it must judge seq 7 on the stored head.
        assert await a.ingest("n1", n1[6:7]) == (7, 8)
        with pytest.raises(InvalidArgument, match="gap"):  # b's cached head is stale too
            await b.ingest("n1", n1[8:])
        with pytest.raises(AlreadyExists, match="fork"):
            await b.ingest("n1", _chain("n1", [other1] * 7)[6:])
        # Concurrent appends for different nodes through both ledgers.
        await asyncio.gather(a.ingest("n2", n2[2:]), b.ingest("n1", n1[7:]))
        cp_b = await b.checkpoint(fresh=True)
        cp_a = await a.checkpoint()
        assert cp_a.tree_size == cp_b.tree_size == a.size == b.size == 13
        assert cp_a.root_hash == cp_b.root_hash
        size, proof = await b.inclusion_proof(8)  # n1 seq 7, appended through a
        assert size == 13
        assert merkle.verify_inclusion(merkle.leaf_hash(n1[6][1]), 8, 13, proof, cp_a.root_hash)
        for ledger in (a, b):
            bundle = await ledger.export()
            report = verify_bundle(bundle, [CONTROL.public])
            # The tasks never finished, nor their leases:
            assert report.checks_failed() == {"task.final", "lease.closed"}
            assert sorted(e.leaf_index for e in bundle.entries) == list(range(13))
    finally:
        await other.close()
