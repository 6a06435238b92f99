"""One contract for every environment's idea catalog, checked through the project's own patching
path (the one the offline stand-in's diffs take in a search): every entry is well-formed, and its
diff applies, is revised, or is rejected exactly as its `expect` says."""

from __future__ import annotations

import py_compile
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from hpc_executor.cli import CONF_DIR, choices
from hpc_executor.config import register_configs
from hpc_executor.environment import Environment
from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected
from hpc_executor.patching import apply_diff
from hpc_executor.trial_dir import copy_baseline

EXPECTS = {"improves", "neutral", "worse", "crash", "timeout", "invalid", "tamper", "rejected", "apply_fail"}
CATEGORIES = {"architecture", "optimizer", "schedule", "regularization", "data", "other"}
PASSES = {"improves", "neutral", "worse", "crash", "timeout", "invalid", "tamper"}  # apply, then run


def environments() -> dict[str, Environment]:
    """One environment per catalog (the CPU presets share their paper environment's catalog)."""
    register_configs()
    found: dict[str, Environment] = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in choices("env"):
            env = Environment(compose("search", overrides=[f"+env={name}", "+model=offline"]).env)
            found.setdefault(str(env.catalog_path()), env)
    return {env.name: env for env in found.values()}


ENVS = environments()
ENTRIES = [
    (env, entry)
    for env in ENVS.values()
    for entry in yaml.safe_load(env.catalog_path().read_text())  # type: ignore[union-attr]
]


def filled(diff: str, entry: dict) -> str:
    for name, values in (entry.get("params") or {}).items():
        diff = diff.replace(f"<<{name}>>", str(values[0]))
    return diff


@pytest.mark.parametrize("name", sorted(ENVS))
def test_catalog_is_well_formed(name: str) -> None:
    catalog = [entry for env, entry in ENTRIES if env.name == name]
    ids = [entry["id"] for entry in catalog]
    assert len(ids) == len(set(ids)) >= 6
    for entry in catalog:
        assert {"id", "title", "description", "category", "diff", "expect"} <= set(entry), entry["id"]
        assert re.fullmatch(r"[a-z][a-z0-9_]*", entry["id"]) and entry["title"] and entry["description"]
        assert entry["expect"] in EXPECTS and entry["category"] in CATEGORIES, entry["id"]
        declared = set(entry.get("params") or {})
        for key in ("diff", "revised_diff"):
            assert set(re.findall(r"<<(\w+)>>", entry.get(key, ""))) <= declared, (entry["id"], key)
        assert all(f"<<{p}>>" in entry["diff"] for p in declared), f"{entry['id']}: a parameter is never used"
        assert bool(entry.get("revised_diff")) == (entry["expect"] == "apply_fail"), entry["id"]
    expects = {entry["expect"] for entry in catalog}
    assert {"improves", "rejected"} <= expects, "the stand-in must find gains and meet the policy"
    assert any(entry.get("miscounted_header") for entry in catalog), "hunk-header repair is exercised"


def plain_git_apply_fails(diff: str, workspace: Path) -> bool:
    """Without recounting, a miscounted diff really does not apply (run outside any repository)."""
    proc = subprocess.run(["git", "apply", "--check", "-"], cwd=workspace, input=diff, text=True,
                          capture_output=True, env={"GIT_CEILING_DIRECTORIES": str(workspace.parent), "PATH": "/usr/bin:/bin"})  # fmt: skip
    return proc.returncode != 0


@pytest.mark.parametrize(
    ("env", "entry"), ENTRIES, ids=[f"{env.name}-{entry['id']}" for env, entry in ENTRIES]
)
def test_catalog_diff_meets_its_expectation(env: Environment, entry: dict, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    copy_baseline(env.baseline_dir, workspace)
    diff = filled(entry["diff"], entry)
    if entry["expect"] == "rejected":
        with pytest.raises(PatchRejected) as rejected:
            apply_diff(diff, workspace, env.policy)
        assert not isinstance(rejected.value, NotADiff), "rejected for the policy, not for its form"
        return
    if entry["expect"] == "apply_fail":
        with pytest.raises(PatchFailed):
            apply_diff(diff, workspace, env.policy)
        diff = filled(entry["revised_diff"], entry)
    if entry.get("miscounted_header"):
        assert plain_git_apply_fails(diff, workspace), "marked miscounted, but applies as written"
    applied = apply_diff(diff, workspace, env.policy)
    assert entry["expect"] in PASSES | {"apply_fail"}
    for path in re.findall(r"^\+\+\+ b/(\S+)", applied, flags=re.MULTILINE):
        if path.endswith(".py"):
            py_compile.compile(str(workspace / path), doraise=True)
