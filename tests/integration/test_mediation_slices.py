"""Budget slices and the single STARTED round trip: real control plane and sidecar.

The sidecar reserves budget in growing slices and spends them locally; these
tests prove the control plane's figure is settled to the actual spend at the
end, and that a STARTED record this sidecar left behind (a timeout) still
stops a non-idempotent retry now that no LookupToolCall precedes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.agent import AgentClient
from tether.core import errors as E
from tether.testing import start_control, start_sidecar


def policy(shared: Path, *, budget: int) -> str:
    """A priced append tool and a sleep tool with a short timeout."""
    return f"""
version = 1
[agents.alice]
queues = ["work"]
[tools.append]
adapter = "python"
cost_micros = 100
[tools.append.python]
entrypoint = "tether.sidecar.tools.builtin:append_line"
config = {{ path = "{shared}" }}
[tools.sleep]
adapter = "python"
timeout_ms = 200
[tools.sleep.python]
entrypoint = "tether.sidecar.tools.builtin:sleep"
[queues.work]
tools = ["append", "sleep"]
budget_micros = {budget}
"""


async def claim(agent: AgentClient) -> str:
    task = await agent.claim("work", wait_ms=2000)
    assert task is not None
    return task.task_id


async def test_unspent_slice_is_returned_when_the_task_completes(tmp_path: Path) -> None:
    """Four calls of 100 reserve slices of 100, 200, 400; completion settles spend to 400."""
    shared = tmp_path / "shared.txt"
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(shared, budget=10_000))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        outs = [await agent.call_tool(tid, "append", {"line": f"l{i}"}) for i in range(4)]
        assert [o.cost_micros for o in outs] == [100] * 4
        assert outs[-1].budget_remaining_micros == 10_000 - 400
        during = (await control.client.get_task(tid)).task.budget_spent_micros
        assert 400 <= during <= 700  # the open slice counts as spent, never less
        assert (await agent.complete(tid))[0] == "succeeded"
        after = (await control.client.get_task(tid)).task.budget_spent_micros
        assert after == 400
        assert shared.read_text().splitlines() == ["l0", "l1", "l2", "l3"]


async def test_budget_exhaustion_is_exact_across_slices(tmp_path: Path) -> None:
    """A budget of 350 runs exactly three calls of 100, then RESOURCE_EXHAUSTED."""
    shared = tmp_path / "shared.txt"
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(shared, budget=350))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        for i in range(3):
            await agent.call_tool(tid, "append", {"line": f"l{i}"})
        with pytest.raises(E.BudgetExhausted):
            await agent.call_tool(tid, "append", {"line": "no"})
        assert len(shared.read_text().splitlines()) == 3
        assert (await agent.complete(tid))[0] == "succeeded"
        assert (await control.client.get_task(tid)).task.budget_spent_micros == 300


async def test_timed_out_keyed_call_is_not_rerun_by_the_same_sidecar(tmp_path: Path) -> None:
    """A keyed call that timed out left its STARTED record: a retry is ABORTED, not re-run."""
    async with (
        start_control(tmp_path) as control,
        start_sidecar(tmp_path, control.address) as side,
        side.agent("alice") as agent,
    ):
        await control.client.put_policy(policy(tmp_path / "unused.txt", budget=0))
        await control.client.submit("work", b"{}")
        tid = await claim(agent)
        with pytest.raises(E.ToolTimeout):
            await agent.call_tool(tid, "sleep", {"seconds": 2}, idempotency_key="nap")
        with pytest.raises(E.OutcomeUnknown, match="outcome is unknown"):
            await agent.call_tool(tid, "sleep", {"seconds": 2}, idempotency_key="nap")
