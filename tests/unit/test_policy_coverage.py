"""Every field of the policy schema is enforced by a named test, or says why it grants nothing.

The schema is the frozen dataclasses of `tether.core.policy`, found by walking the
field types from `Policy` down, so a new spec class is found as soon as a field
refers to it. Each field is in exactly one of three tables:

- `ENFORCED`: "Class.field" -> tests ("tests/<path>.py::test_name") that show, with
  real servers and processes, the field enforced where the action happens: a grant
  refused when absent, a limit stopping the call, the policy (not the agent)
  deciding what runs.
- `NOT_GRANTS`: the few fields that grant nothing, each with a one-line reason.
- `SECTIONS`: fields that only hold another spec class, whose own fields are mapped.

A new schema field fails this module, by name, until it is mapped; a mapped test
that does not exist and an entry for a field that no longer exists fail too. The
tests are found by parsing their files (`ast`), never by importing them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.core import policy

ROOT = Path(__file__).resolve().parents[2]

HOSTILE = "tests/integration/test_hostile_agent.py"
HTTP = "tests/integration/test_http_tool.py"
HTTP_HOSTILE = "tests/integration/test_http_hostile.py"
EXEC = "tests/integration/test_exec_tool.py"
MCP = "tests/integration/test_mcp_tool.py"
CONTAIN = "tests/integration/test_containment.py"
MEDIATION = "tests/integration/test_mediation.py"
SLICES = "tests/integration/test_mediation_slices.py"
BUDGET = "tests/integration/test_control_budget.py"
VAULT = "tests/integration/test_control_vault.py"
BROKER = "tests/integration/test_sidecar_broker.py"
ENFORCE = "tests/integration/test_policy_enforcement.py"
TIMEOUTS = "tests/integration/test_timeouts.py"

ENFORCED: dict[str, tuple[str, ...]] = {
    # --- the document
    "Policy.version": (
        f"{ENFORCE}::test_policy_of_another_version_is_refused_and_the_old_one_stays",
    ),
    # --- agents
    "AgentSpec.queues": (f"{HOSTILE}::test_agent_the_policy_does_not_grant_is_refused_at_claim",),
    # --- credentials
    "CredentialSpec.tools": (
        f"{VAULT}::test_denials_name_credential_and_tool",
        f"{ENFORCE}::test_credential_not_listing_the_tool_is_refused_at_apply_and_at_issue",
    ),
    # --- tools
    "ToolSpec.input_schema": (
        "tests/integration/test_mcp_front.py::"
        "test_sdk_client_lists_calls_and_is_refused_with_receipts",
    ),
    "ToolSpec.cost_micros": (
        f"{MEDIATION}::test_budget_allows_exactly_ten_of_twenty_concurrent_calls",
        f"{SLICES}::test_budget_exhaustion_is_exact_across_slices",
    ),
    "ToolSpec.idempotent": (f"{MEDIATION}::test_started_record_reruns_only_idempotent_tools",),
    "ToolSpec.timeout_ms": (
        f"{HOSTILE}::test_sync_python_tool_neither_blocks_the_node_nor_outlives_its_timeout",
        f"{CONTAIN}::test_setsid_grandchild_is_gone_after_the_timeout",
        f"{EXEC}::test_killed_at_timeout_with_its_process_group",
    ),
    "ToolSpec.credential": (
        f"{ENFORCE}::test_credential_reaches_only_the_tool_that_declares_it",
        f"{HTTP}::test_server_sees_credential_and_fencing_agent_never_does",
    ),
    # --- http
    "HttpSpec.base_url": (
        f"{HTTP}::test_server_sees_credential_and_fencing_agent_never_does",
        f"{HTTP}::test_request_shape_is_policed",
        f"{HTTP}::test_base_host_must_be_allowlisted",
    ),
    "HttpSpec.allowed_methods": (f"{HTTP}::test_request_shape_is_policed",),
    "HttpSpec.auth_header": (f"{HTTP}::test_custom_auth_header_is_protected_too",),
    "HttpSpec.auth_template": (
        f"{HTTP}::test_custom_auth_header_is_protected_too",
        f"{HTTP}::test_server_sees_credential_and_fencing_agent_never_does",
    ),
    "HttpSpec.max_response_bytes": (
        f"{HTTP}::test_response_cap_timeout_and_reported_cost",
        f"{HTTP_HOSTILE}::test_decompression_bomb_is_refused_within_bounded_memory",
    ),
    "HttpSpec.follow_redirects": (f"{HTTP}::test_on_list_redirect_followed_and_loops_bounded",),
    "HttpSpec.allowed_headers": (
        f"{HTTP_HOSTILE}::test_agent_representation_headers_are_refused_before_sending",
    ),
    # --- exec
    "ExecSpec.argv": (f"{EXEC}::test_param_is_one_argv_element_not_a_shell",),
    "ExecSpec.params": (
        f"{EXEC}::test_path_params_and_undeclared_params_are_refused",
        f"{EXEC}::test_param_is_one_argv_element_not_a_shell",
    ),
    "ExecSpec.path_params": (f"{EXEC}::test_path_params_and_undeclared_params_are_refused",),
    "ExecSpec.env": (f"{EXEC}::test_env_holds_only_declared_vars_and_secret_is_redacted",),
    "ExecSpec.secret_env": (
        f"{EXEC}::test_env_holds_only_declared_vars_and_secret_is_redacted",
        f"{EXEC}::test_secret_used_by_child_but_not_returned",
        f"{CONTAIN}::test_control_plane_refuses_such_a_policy",
    ),
    "ExecSpec.read_paths": (f"{ENFORCE}::test_exec_read_paths_are_the_only_extra_readable_paths",),
    "ExecSpec.cpu_seconds": (f"{EXEC}::test_cpu_limit_and_output_cap",),
    "ExecSpec.memory_mb": (f"{EXEC}::test_memory_and_file_size_limits",),
    "ExecSpec.file_size_mb": (f"{EXEC}::test_memory_and_file_size_limits",),
    "ExecSpec.max_output_bytes": (f"{EXEC}::test_cpu_limit_and_output_cap",),
    "ExecSpec.max_processes": (f"{CONTAIN}::test_fork_bomb_is_stopped_by_rlimit_nproc",),
    # --- mcp
    "McpSpec.argv": (
        f"{MCP}::test_call_returns_server_result",
        f"{MCP}::test_server_that_never_starts",
    ),
    "McpSpec.tool": (
        f"{ENFORCE}::test_mcp_tool_is_fixed_by_policy_not_by_the_agent",
        f"{MCP}::test_tool_name_defaults_to_tether_name",
    ),
    "McpSpec.env": (f"{MCP}::test_secret_reaches_server_but_is_redacted",),
    "McpSpec.secret_env": (
        f"{MCP}::test_secret_reaches_server_but_is_redacted",
        f"{MCP}::test_end_to_end_server_lives_as_long_as_the_lease",
    ),
    "McpSpec.read_paths": (
        f"{ENFORCE}::test_mcp_read_paths_decide_whether_the_server_can_be_read",
    ),
    "McpSpec.startup_timeout_ms": (f"{MCP}::test_startup_timeout",),
    "McpSpec.cpu_seconds": (f"{ENFORCE}::test_mcp_cpu_seconds_stops_the_server",),
    "McpSpec.memory_mb": (f"{ENFORCE}::test_mcp_memory_mb_caps_the_servers_address_space",),
    "McpSpec.file_size_mb": (f"{ENFORCE}::test_mcp_file_size_mb_stops_a_large_write",),
    "McpSpec.max_output_bytes": (f"{ENFORCE}::test_mcp_max_output_bytes_refuses_a_larger_message",),
    "McpSpec.max_processes": (f"{ENFORCE}::test_mcp_max_processes_stops_a_fork_bomb",),
    # --- python
    "PythonSpec.entrypoint": (f"{BROKER}::test_granted_python_tool_runs_with_receipt",),
    "PythonSpec.config": (f"{ENFORCE}::test_python_config_comes_from_policy_not_from_the_agent",),
    # --- queues
    "QueueSpec.name": (f"{HOSTILE}::test_undeclared_queue_is_refused_at_submit_and_claim",),
    "QueueSpec.tools": (
        f"{MEDIATION}::test_ungranted_tool_is_permission_denied_naming_it",
        f"{BROKER}::test_tool_outside_lease_scope_is_denied_with_receipt",
    ),
    "QueueSpec.network_allowlist": (
        f"{CONTAIN}::test_tool_without_network_grant_reaches_nothing",
        f"{CONTAIN}::test_allowlist_grants_only_its_hosts_and_ports",
        f"{HTTP}::test_redirect_to_off_list_host_is_refused",
    ),
    "QueueSpec.filesystem_scope": (f"{HOSTILE}::test_filesystem_scope_and_max_artifact_bytes",),
    "QueueSpec.memory_scope": (f"{HOSTILE}::test_memory_scope_task_refuses_agent_memory",),
    "QueueSpec.budget_micros": (
        f"{BUDGET}::test_twenty_concurrent_reservations_against_room_for_ten",
        f"{BUDGET}::test_task_limit_overrides_the_policy_and_no_policy_budget_means_free_calls_only",
        f"{MEDIATION}::test_budget_allows_exactly_ten_of_twenty_concurrent_calls",
    ),
    "QueueSpec.lease_ttl_ms": (
        f"{ENFORCE}::test_queue_lease_ttl_ms_bounds_a_silent_holder",
        f"{HOSTILE}::test_skewed_stale_holder_is_refused_before_any_side_effect",
    ),
    "QueueSpec.max_attempts": (f"{ENFORCE}::test_queue_max_attempts_expires_the_task",),
    "QueueSpec.max_artifact_bytes": (f"{HOSTILE}::test_filesystem_scope_and_max_artifact_bytes",),
    "QueueSpec.attempt_timeout_ms": (
        f"{TIMEOUTS}::test_attempt_timeout_retries_on_the_queue_schedule_then_expires",
    ),
    "QueueSpec.deadline_ms": (
        f"{TIMEOUTS}::test_a_slow_http_write_is_cut_off_at_the_queue_deadline",
    ),
    "QueueSpec.schedule_to_start_timeout_ms": (
        f"{TIMEOUTS}::test_schedule_to_start_expires_a_task_nobody_claims",
    ),
    # [queues.NAME.retry] (a tether.core.timeouts.RetryPolicy): delays and cap, attempts,
    # failure retries and non-retryable types.
    "QueueSpec.retry": (
        f"{TIMEOUTS}::test_attempt_timeout_retries_on_the_queue_schedule_then_expires",
        f"{TIMEOUTS}::test_failures_retry_by_policy_and_a_non_retryable_one_is_not",
    ),
}

NOT_GRANTS: dict[str, str] = {
    "Policy.text": "the document's own bytes as applied, not a key in it",
    "Policy.digest": "derived (SHA-256 of the bytes) so leases and receipts can name the policy",
    "AgentSpec.name": "the table key [agents.NAME]; what it grants is `queues`",
    "AgentSpec.description": "documentation only",
    "CredentialSpec.name": "the table key [credentials.NAME]; what it grants is `tools`",
    "CredentialSpec.description": "documentation only",
    "ToolSpec.name": "the table key [tools.NAME]; queues grant it through `QueueSpec.tools`",
    "ToolSpec.adapter": "picks which one adapter section applies; that section's fields are mapped",
    "ToolSpec.description": "shown to MCP clients in tools/list; grants nothing",
    "QueueSpec.description": "documentation only",
}

SECTIONS: dict[str, str] = {
    "Policy.agents": "AgentSpec",
    "Policy.credentials": "CredentialSpec",
    "Policy.tools": "ToolSpec",
    "Policy.queues": "QueueSpec",
    "ToolSpec.http": "HttpSpec",
    "ToolSpec.exec": "ExecSpec",
    "ToolSpec.python": "PythonSpec",
    "ToolSpec.mcp": "McpSpec",
}

DOCUMENTED = {
    "Policy",
    "AgentSpec",
    "CredentialSpec",
    "HttpSpec",
    "ExecSpec",
    "McpSpec",
    "PythonSpec",
    "ToolSpec",
    "QueueSpec",
}


def _types_in(tp: object) -> Iterator[object]:
    """`tp` and every type argument nested in it (Mapping[str, X], X | None, ...)."""
    yield tp
    for arg in typing.get_args(tp):
        yield from _types_in(arg)


def _schema_classes(tp: object) -> set[str]:
    """Names of the schema dataclasses that the annotation `tp` refers to."""
    return {
        t.__name__
        for t in _types_in(tp)
        if isinstance(t, type) and dataclasses.is_dataclass(t) and t.__module__ == policy.__name__
    }


@functools.cache
def schema() -> dict[str, dict[str, object]]:
    """Class name -> {field name: resolved annotation}, walking from `Policy` down."""
    found: dict[str, dict[str, object]] = {}
    pending: list[type] = [policy.Policy]
    while pending:
        cls = pending.pop()
        if cls.__name__ in found:
            continue
        hints = typing.get_type_hints(cls)
        found[cls.__name__] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        for tp in found[cls.__name__].values():
            pending += [getattr(policy, name) for name in _schema_classes(tp)]
    return found


def schema_fields() -> list[str]:
    """Every "Class.field" of the schema, sorted."""
    return sorted(f"{cls}.{name}" for cls, fields in schema().items() for name in fields)


@functools.cache
def defined_tests(path: str) -> frozenset[str]:
    """Names of the test functions defined at the top of `path` (and "Class::test" in classes)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return frozenset(n for n in names if n.rsplit("::", 1)[-1].startswith("test"))


def test_the_walk_finds_every_documented_schema_class() -> None:
    """The walk from Policy reaches every spec class docs/policy.md describes."""
    missing = DOCUMENTED - set(schema())
    assert not missing, f"the schema walk no longer reaches {sorted(missing)}"


@pytest.mark.parametrize("field", schema_fields())
def test_schema_field_is_enforced_or_says_why_not(field: str) -> None:
    """Each schema field has an enforcement test, or is a section, or grants nothing."""
    assert field in ENFORCED or field in NOT_GRANTS or field in SECTIONS, (
        f"policy field {field} has no enforcement test: write one that shows it enforced "
        "at the point of action and map it in ENFORCED (or, if the field grants nothing, "
        "list it in NOT_GRANTS with the reason)"
    )


def test_no_entry_names_a_field_the_schema_lacks() -> None:
    """An entry for a field that was removed or renamed is stale and fails, naming it."""
    fields = set(schema_fields())
    for table, entries in (("ENFORCED", ENFORCED), ("NOT_GRANTS", NOT_GRANTS)):
        stale = sorted(set(entries) - fields)
        assert not stale, f"{table} names fields the schema no longer has: {stale}"
    stale = sorted(set(SECTIONS) - fields)
    assert not stale, f"SECTIONS names fields the schema no longer has: {stale}"


def test_each_field_is_in_exactly_one_table() -> None:
    """A field is enforced, exempt or a section: never two of these at once."""
    tables = {"ENFORCED": set(ENFORCED), "NOT_GRANTS": set(NOT_GRANTS), "SECTIONS": set(SECTIONS)}
    for field in schema_fields():
        holders = [name for name, keys in tables.items() if field in keys]
        assert len(holders) <= 1, f"{field} is in {holders}"


def test_sections_hold_the_class_they_name() -> None:
    """A SECTIONS entry's field really holds that spec class (and no other schema class)."""
    for field, cls in SECTIONS.items():
        owner, name = field.split(".")
        held = _schema_classes(schema().get(owner, {}).get(name))
        assert held == {cls}, f"{field} holds {sorted(held)}, not {cls}"


def test_exemption_reasons_are_one_line() -> None:
    """Each field that grants nothing says why in one non-empty line."""
    for field, reason in NOT_GRANTS.items():
        assert reason.strip(), f"{field} has no reason"
        assert "\n" not in reason, f"{field}: keep the reason to one line"


@pytest.mark.parametrize("field", sorted(ENFORCED))
def test_mapped_enforcement_tests_exist(field: str) -> None:
    """Every test a field is mapped to exists: its file parses and defines that function."""
    refs = ENFORCED[field]
    assert refs, f"{field} is mapped to no test"
    for ref in refs:
        assert re.fullmatch(r"tests/[\w/]+\.py::\w+(::\w+)?", ref), (
            f"{field}: {ref!r} is not 'tests/<path>.py::test_name'"
        )
        path, _, name = ref.partition("::")
        assert (ROOT / path).is_file(), f"{field}: {path} does not exist"
        assert name in defined_tests(path), f"{field}: {path} defines no test {name!r}"
