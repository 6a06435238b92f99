"""Tests for hpc_executor.patching: policy rejections, header repair, extraction and git apply."""

from __future__ import annotations

import difflib
import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected
from hpc_executor.patching import (
    MAX_ANSWER_CHARS,
    WorkspacePolicy,
    apply_diff,
    check_answer_size,
    extract_diff,
    parse_diff,
    path_matches,
    repair_hunk_headers,
)

TRAIN = "".join(
    [
        "import os\n",
        "\n",
        "lr = 1e-3\n",
        "steps = 100\n",
        "\n",
        "\n",
        "def step(model, batch):\n",
        "    loss = model(batch)\n",
        "    loss.backward()\n",
        "    return loss\n",
        "\n",
        "\n",
        "def main():\n",
        "    for i in range(steps):\n",
        "        step(None, i)\n",
        "    print('done')\n",
    ]
)
MODEL = "class Model:\n    width = 64\n    depth = 2\n"
FILES = {
    "train.py": TRAIN,
    "model.py": MODEL,
    "evaluate.py": "print('frozen evaluator')\n",
    "prepare_data.py": "print('prepare')\n",
    "README.md": "# baseline\n",
    "pkg/util.py": "def helper():\n    return 1\n",
    "pkg/frozen.py": "SECRET = 1\n",
}
POLICY = WorkspacePolicy(
    editable=("train.py", "model.py", "pkg/**"),
    protected=("evaluate.py", "prepare_data.py", "pkg/frozen.py"),
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def tree_hash(root: Path) -> str:
    """Hash of every path, type, mode, content and link target under root (links not followed)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{info.st_mode}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def unified(old: str, new: str, path: str, n: int = 3) -> str:
    """A correct diff, as difflib prints it (the same header format as git)."""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}", n=n
    )
    return "".join(lines)


def edited_train() -> str:
    return TRAIN.replace("lr = 1e-3", "lr = 3e-3").replace(
        "    print('done')\n", "    print('done', steps)\n"
    )


# --------------------------------------------------------------------------- applying


def test_modify_applies_and_canonical_diff_is_stable(workspace: Path, tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    shutil.copytree(workspace, pristine)
    new_train = edited_train()
    canonical = apply_diff(unified(TRAIN, new_train, "train.py"), workspace, POLICY)
    assert (workspace / "train.py").read_text() == new_train
    assert canonical.startswith("diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1,")
    # The stored diff re-applies to a pristine copy and normalises to itself.
    assert apply_diff(canonical, pristine, POLICY) == canonical
    assert (pristine / "train.py").read_text() == new_train


def test_plain_diff_without_git_lines_new_file_delete_and_several_hunks(workspace: Path) -> None:
    new_train = edited_train()
    diff = (
        unified(TRAIN, new_train, "train.py", n=1)  # two hunks
        + unified("", "HIDDEN = 128\n", "pkg/layers.py").replace("--- a/pkg/layers.py", "--- /dev/null")
        + unified(FILES["pkg/util.py"], "", "pkg/util.py").replace("+++ b/pkg/util.py", "+++ /dev/null")
    )
    assert diff.count("@@ -") == 4
    canonical = apply_diff(diff, workspace, POLICY)
    assert (workspace / "train.py").read_text() == new_train
    assert (workspace / "pkg/layers.py").read_text() == "HIDDEN = 128\n"
    assert not (workspace / "pkg/util.py").exists()
    assert "new file mode 100644\n--- /dev/null\n+++ b/pkg/layers.py" in canonical
    assert "deleted file mode 100644\n--- a/pkg/util.py\n+++ /dev/null" in canonical


def test_git_format_diff_with_rename_and_copy_inside_editable_set(workspace: Path) -> None:
    diff = (
        "diff --git a/pkg/util.py b/pkg/helpers.py\n"
        "similarity index 80%\n"
        "rename from pkg/util.py\n"
        "rename to pkg/helpers.py\n"
        "--- a/pkg/util.py\n"
        "+++ b/pkg/helpers.py\n"
        "@@ -1,2 +1,2 @@\n"
        " def helper():\n"
        "-    return 1\n"
        "+    return 2\n"
        "diff --git a/model.py b/pkg/model_copy.py\n"
        "copy from model.py\n"
        "copy to pkg/model_copy.py\n"
    )
    changes = parse_diff(diff)
    assert [(c.kind, c.old_path, c.new_path) for c in changes] == [
        ("rename", "pkg/util.py", "pkg/helpers.py"),
        ("copy", "model.py", "pkg/model_copy.py"),
    ]
    apply_diff(diff, workspace, POLICY)
    assert not (workspace / "pkg/util.py").exists()
    assert (workspace / "pkg/helpers.py").read_text() == "def helper():\n    return 2\n"
    assert (workspace / "pkg/model_copy.py").read_text() == MODEL


def test_p0_diff_without_prefixes_applies(workspace: Path) -> None:
    diff = unified(MODEL, MODEL.replace("64", "128"), "model.py")
    diff = diff.replace("--- a/model.py", "--- model.py").replace("+++ b/model.py", "+++ model.py")
    assert parse_diff(diff)[0].new_path == "model.py"
    apply_diff(diff, workspace, POLICY)
    assert "width = 128" in (workspace / "model.py").read_text()


def test_git_header_with_dev_null_but_no_mode_line_creates_the_file(workspace: Path) -> None:
    # Passed to git as written, this is a rename *from a file called dev/null*.
    diff = "diff --git a/pkg/new.py b/pkg/new.py\n--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1 @@\n+X = 1\n"
    canonical = apply_diff(diff, workspace, POLICY)
    assert "new file mode 100644\n" in canonical
    assert (workspace / "pkg/new.py").read_text() == "X = 1\n"
    assert not (workspace / "dev").exists()


def test_quoted_names_and_gnu_timestamps(workspace: Path) -> None:
    (workspace / "pkg/my dir").mkdir()
    (workspace / "pkg/my dir/\u00e9 q.py").write_text("a = 1\n")
    quoted = '"a/pkg/my dir/\\303\\251 q.py"'
    diff = (
        f"diff --git {quoted} {quoted.replace('a/', 'b/')}\n--- {quoted}\n+++ {quoted.replace('a/', 'b/')}\n"
    )
    diff += "@@ -1 +1 @@\n-a = 1\n+a = 2\n"
    diff += "--- a/model.py\t2026-11-27 09:00:00.000000000 +0000\n+++ b/model.py\t2026-11-27 09:01:00 +0000\n"
    diff += "@@ -1,2 +1,2 @@\n class Model:\n-    width = 64\n+    width = 80\n"
    assert [c.path for c in parse_diff(diff)] == ["pkg/my dir/\u00e9 q.py", "model.py"]
    apply_diff(diff, workspace, POLICY)
    assert (workspace / "pkg/my dir/\u00e9 q.py").read_text() == "a = 2\n"
    assert "width = 80" in (workspace / "model.py").read_text()


def test_hunks_without_trailing_context_apply_where_their_header_says(workspace: Path) -> None:
    # Without trailing context git would anchor these hunks to the end of the file.
    diff = (
        "--- a/train.py\n+++ b/train.py\n"
        "@@ -3,0 +4 @@\n+warmup = 10\n"  # zero context: an insertion after line 3
        "@@ -13,2 +14,2 @@\n def main():\n-    for i in range(steps):\n+    for i in range(steps + warmup):\n"
    )
    apply_diff(diff, workspace, POLICY)
    lines = (workspace / "train.py").read_text().splitlines()
    assert lines[2:5] == ["lr = 1e-3", "warmup = 10", "steps = 100"]
    assert lines[14] == "    for i in range(steps + warmup):"


def test_new_file_inside_editable_set_is_allowed(workspace: Path) -> None:
    apply_diff("--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1 @@\n+X = 1\n", workspace, POLICY)
    assert (workspace / "pkg/new.py").read_text() == "X = 1\n"
    assert (workspace / "pkg/new.py").stat().st_mode & 0o111 == 0


def test_deleting_an_executable_editable_file_is_allowed(workspace: Path) -> None:
    (workspace / "pkg/run.sh").write_text("echo hi\n")
    (workspace / "pkg/run.sh").chmod(0o755)
    diff = "diff --git a/pkg/run.sh b/pkg/run.sh\ndeleted file mode 100755\n--- a/pkg/run.sh\n+++ /dev/null\n"
    apply_diff(diff + "@@ -1 +0,0 @@\n-echo hi\n", workspace, POLICY)
    assert not (workspace / "pkg/run.sh").exists()


def test_no_newline_at_end_of_file_marker(workspace: Path) -> None:
    (workspace / "model.py").write_text("a = 1\nb = 2")  # no final newline
    diff = (
        "--- a/model.py\n+++ b/model.py\n@@ -1,9 +1,7 @@\n a = 1\n-b = 2\n"
        "\\ No newline at end of file\n+b = 3\n\\ No newline at end of file\n"
    )
    repaired = repair_hunk_headers(diff)
    assert "@@ -1,2 +1,2 @@\n" in repaired
    apply_diff(diff, workspace, POLICY)
    assert (workspace / "model.py").read_text() == "a = 1\nb = 3"


# --------------------------------------------------------------------------- rejections


def _git_new_file(path: str, mode: str, body: str = "+x = 1\n") -> str:
    header = f"diff --git a/{path} b/{path}\nnew file mode {mode}\n"
    return header + f"--- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n{body}"


REJECTIONS = {
    "absolute_path": ("--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-root\n+toor\n", "absolute paths"),
    "absolute_after_prefix": ("--- a//tmp/x.py\n+++ b//tmp/x.py\n@@ -1 +1 @@\n-a\n+b\n", "absolute paths"),
    "dotdot": ("--- a/../outside.py\n+++ b/../outside.py\n@@ -1 +1 @@\n-a\n+b\n", "'..'"),
    "dotdot_inside": ("--- a/pkg/../evaluate.py\n+++ b/pkg/../evaluate.py\n@@ -1 +1 @@\n-a\n+b\n", "'..'"),
    "outside_editable": (
        "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-# baseline\n+# hacked\n",
        "README.md",
    ),
    "new_file_outside_editable": (
        "--- /dev/null\n+++ b/notes.py\n@@ -0,0 +1 @@\n+x = 1\n",
        "'notes.py' is outside the editable set",
    ),
    "protected": (
        "--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1 +1 @@\n-print('frozen evaluator')\n+print(0)\n",
        "'evaluate.py' is protected",
    ),
    "protected_under_editable_glob": (
        "--- a/pkg/frozen.py\n+++ b/pkg/frozen.py\n@@ -1 +1 @@\n-SECRET = 1\n+SECRET = 2\n",
        "'pkg/frozen.py' is protected",
    ),
    "protected_delete": (
        "--- a/prepare_data.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-print('prepare')\n",
        "'prepare_data.py' is protected",
    ),
    "symlink_in_diff": (_git_new_file("pkg/link.py", "120000", "+/etc/passwd\n"), "symlinks"),
    "submodule": (
        "diff --git a/pkg/sub b/pkg/sub\nnew file mode 160000\n--- /dev/null\n+++ b/pkg/sub\n"
        "@@ -0,0 +1 @@\n+Subproject commit 1234567890123456789012345678901234567890\n",
        "submodules",
    ),
    "executable_new_file": (_git_new_file("pkg/run.sh", "100755"), "mode 100644"),
    "mode_change": ("diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n", "mode changes"),
    "git_binary_patch": (
        "diff --git a/model.py b/model.py\nindex 1234567..89abcde 100644\nGIT binary patch\n"
        "literal 5\nMcmZ?wbaHV500BJ$`~Uy|\n\nliteral 0\nHcmV?d00001\n",
        "binary",
    ),
    "binary_files_differ": ("Binary files a/model.py and b/model.py differ\n", "binary"),
    "rename_out_of_editable_set": (
        "diff --git a/train.py b/train_backup.py\nrename from train.py\nrename to train_backup.py\n",
        "'train_backup.py' is outside the editable set",
    ),
    "rename_of_protected": (
        "diff --git a/evaluate.py b/pkg/evaluate.py\nrename from evaluate.py\nrename to pkg/evaluate.py\n",
        "'evaluate.py' is protected",
    ),
    "copy_from_protected": (
        "diff --git a/evaluate.py b/pkg/ev.py\ncopy from evaluate.py\ncopy to pkg/ev.py\n",
        "'evaluate.py' is protected",
    ),
    "dot_git": (
        "--- /dev/null\n+++ b/pkg/.git/hooks/post-checkout\n@@ -0,0 +1 @@\n+echo pwned\n",
        "inside .git",
    ),
    "one_bad_file_rejects_all": (
        unified(MODEL, MODEL.replace("64", "128"), "model.py")
        + "--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1 +1 @@\n-print('frozen evaluator')\n+print(1)\n",
        "'evaluate.py' is protected",
    ),
    "empty_output": ("", "empty or non-diff output"),
    "prose_only": ("I am sorry, I cannot implement this idea.\n\n```python\nprint(1)\n```\n", "non-diff"),
}


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejections_name_the_reason_and_leave_the_workspace_untouched(workspace: Path, name: str) -> None:
    diff, reason = REJECTIONS[name]
    before = tree_hash(workspace)
    # an answer with no diff in it breaks no policy: it is not a kind of rejection
    with pytest.raises(NotADiff if "non-diff" in reason else PatchRejected) as err:
        apply_diff(diff, workspace, POLICY)
    assert reason in str(err.value)
    assert tree_hash(workspace) == before


def test_protected_file_rejected_even_when_everything_is_editable(workspace: Path) -> None:
    before = tree_hash(workspace)
    policy = WorkspacePolicy(editable=["**"], protected=["evaluate.py"])
    with pytest.raises(PatchRejected, match=r"'evaluate\.py' is protected"):
        apply_diff(REJECTIONS["protected"][0], workspace, policy)
    assert tree_hash(workspace) == before


def test_symlinked_target_file_is_rejected(workspace: Path) -> None:
    (workspace / "pkg/alias.py").symlink_to("../evaluate.py")
    before = tree_hash(workspace)
    diff = "--- a/pkg/alias.py\n+++ b/pkg/alias.py\n@@ -1 +1 @@\n-print('frozen evaluator')\n+print(2)\n"
    with pytest.raises(PatchRejected, match=r"'pkg/alias.py' is a symlink in the workspace"):
        apply_diff(diff, workspace, POLICY)
    assert tree_hash(workspace) == before


def test_symlinked_parent_directory_is_rejected(workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "pkg/escape").symlink_to(outside)
    before = tree_hash(workspace)
    with pytest.raises(PatchRejected, match=r"'pkg/escape' is a symlink in the workspace"):
        apply_diff("--- /dev/null\n+++ b/pkg/escape/new.py\n@@ -0,0 +1 @@\n+x = 1\n", workspace, POLICY)
    assert tree_hash(workspace) == before
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- failures


def test_context_mismatch_fails_with_gits_message_and_writes_nothing(workspace: Path) -> None:
    before = tree_hash(workspace)
    good = unified(MODEL, MODEL.replace("64", "128"), "model.py")
    bad = unified("def main():\n    run()\n", "def main():\n    run(fast=True)\n", "train.py")
    with pytest.raises(PatchFailed) as err:
        apply_diff(good + bad, workspace, POLICY)
    message = str(err.value)
    assert "train.py: patch does not apply" in message
    assert "error: patch failed: train.py:1" in message
    # git apply is all-or-nothing: model.py's hunk, which would apply, was not written either.
    assert tree_hash(workspace) == before


def test_adding_an_existing_file_fails(workspace: Path) -> None:
    before = tree_hash(workspace)
    with pytest.raises(PatchFailed, match="already exists"):
        apply_diff("--- /dev/null\n+++ b/model.py\n@@ -0,0 +1 @@\n+x = 1\n", workspace, POLICY)
    assert tree_hash(workspace) == before


@pytest.mark.parametrize(
    ("diff", "message"),
    [
        ("@@ -1 +1 @@\n-a\n+b\n", "not preceded by a file header"),
        ("--- a/model.py\n+++ b/model.py\n@@ -1,3 +1,3\n-a\n+b\n", "malformed hunk header"),
        ("--- a/model.py\n+++ b/model.py\n@@ one two @@\n-a\n+b\n", "malformed hunk header"),
        (
            "--- a/model.py\n+++ b/model.py\n@@ -1,3 +1,3 @@\n class Model:\n\twidth = 64\n+x\n",
            "not a diff line",
        ),
        ("--- a/model.py\n+++ b/other.py\n@@ -1 +1 @@\n-a\n+b\n", "differ"),
    ],
)
def test_malformed_diffs_fail_for_revision(workspace: Path, diff: str, message: str) -> None:
    before = tree_hash(workspace)
    with pytest.raises(PatchFailed, match=message):
        apply_diff(diff, workspace, POLICY)
    assert tree_hash(workspace) == before


# --------------------------------------------------------------------------- hunk header repair

HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", re.MULTILINE)


def _rewrite_counts(diff: str, counts) -> str:
    """Replace every hunk header's counts with counts(old, new) -> (old text, new text)."""

    def sub(match: re.Match[str]) -> str:
        old, new = int(match[2] or 1), int(match[4] or 1)
        old_text, new_text = counts(old, new)
        return f"@@ -{match[1]}{old_text} +{match[3]}{new_text} @@"

    return HEADER.sub(sub, diff)


MISCOUNTS = {
    "too_large_by_several": lambda old, new: (f",{old + 5}", f",{new + 7}"),
    "too_small": lambda old, new: (f",{max(old - 3, 0)}", f",{max(new - 2, 0)}"),
    "swapped": lambda old, new: (f",{new}", f",{old}"),
    "omitted": lambda old, new: ("", ""),
    "zero": lambda old, new: (",0", ",0"),
}


@pytest.mark.parametrize("style", sorted(MISCOUNTS))
def test_miscounted_headers_are_repaired_then_applied(workspace: Path, style: str) -> None:
    new_train, new_model = edited_train(), MODEL.replace("depth = 2", "depth = 4\n    heads = 8")
    original = unified(TRAIN, new_train, "train.py", n=2) + unified(MODEL, new_model, "model.py")
    broken = _rewrite_counts(original, MISCOUNTS[style])
    assert broken != original
    assert repair_hunk_headers(broken) == original
    apply_diff(broken, workspace, POLICY)
    assert (workspace / "train.py").read_text() == new_train
    assert (workspace / "model.py").read_text() == new_model


def test_repair_is_idempotent_and_leaves_correct_headers_byte_for_byte() -> None:
    correct = unified(TRAIN, edited_train(), "train.py", n=1)
    assert repair_hunk_headers(correct) == correct
    explicit_one = "--- a/m.py\n+++ b/m.py\n@@ -2,1 +2,1 @@ class Model:\n-    width = 64\n+    width = 65\n"
    assert repair_hunk_headers(explicit_one) == explicit_one
    broken = _rewrite_counts(correct, MISCOUNTS["too_large_by_several"])
    once = repair_hunk_headers(broken)
    assert repair_hunk_headers(once) == once


def test_blank_context_lines_without_their_leading_space(workspace: Path) -> None:
    # LLMs print blank context lines as empty lines, inside a hunk and at its end.
    new_train = TRAIN.replace("steps = 100\n", "steps = 200\n").replace(
        "def step(model, batch):\n", "def step(model, batch):\n    model.train()\n"
    )
    diff = (
        "--- a/train.py\n+++ b/train.py\n"
        "@@ -1,4 +1,4 @@\n import os\n\n lr = 1e-3\n-steps = 100\n+steps = 200\n"
        "@@ -7,5 +7,6 @@\n def step(model, batch):\n+    model.train()\n     loss = model(batch)\n"
        "     loss.backward()\n     return loss\n\n"
    )
    assert repair_hunk_headers(diff) == diff  # both headers count the empty lines as context
    canonical = apply_diff(diff, workspace, POLICY)
    assert (workspace / "train.py").read_text() == new_train
    assert "@@ -1,4 +1,4 @@\n import os\n \n lr = 1e-3\n" in canonical  # the spaces are back
    assert canonical.endswith("     return loss\n \n")


def test_trailing_blank_line_counts_as_context_only_when_the_header_needs_it() -> None:
    body = "--- a/m.py\n+++ b/m.py\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n\n"
    # The header wants 3 old lines, the body has 2 + one empty line: the empty line is context.
    assert repair_hunk_headers(body) == body
    assert parse_diff(body)[0].hunks[0].lines == (" a", "-b", "+c", " ")
    # Here the header wants 2: the empty line separates this file from the next one.
    two = (
        "--- a/m.py\n+++ b/m.py\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n\n--- a/n.py\n+++ b/n.py\n@@ -1 +1 @@\n-x\n+y\n"
    )
    assert repair_hunk_headers(two) == two
    assert [c.hunks[0].lines for c in parse_diff(two)] == [(" a", "-b", "+c"), ("-x", "+y")]


def test_removed_line_that_looks_like_a_file_header_stays_in_its_hunk() -> None:
    # "-- SQL comment" removed, "++ counter" added: "--- ..." / "+++ ..." without a following hunk.
    diff = "--- a/q.sql\n+++ b/q.sql\n@@ -1,2 +1,2 @@\n--- old comment\n+++ new comment\n select 1;\n"
    (change,) = parse_diff(diff)
    assert change.hunks[0].lines == ("--- old comment", "+++ new comment", " select 1;")


@pytest.mark.parametrize("seed", range(8))
def test_property_scrambled_difflib_counts_repair_to_the_original(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    old_lines = [f"value_{i} = {rng.randint(0, 999)}\n" if i % 7 else "\n" for i in range(60)]
    new_lines = list(old_lines)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(new_lines))
        edit = rng.choice(["insert", "delete", "replace"])
        if edit == "insert":
            new_lines[at:at] = [f"inserted_{rng.randint(0, 99)} = True\n"] * rng.randint(1, 3)
        elif edit == "delete":
            del new_lines[at : at + rng.randint(1, 3)]
        else:
            new_lines[at] = f"replaced_{rng.randint(0, 99)} = None\n"
    old, new = "".join(old_lines), "".join(new_lines)
    original = unified(old, new, "f.py", n=rng.randint(1, 3))
    if not original:
        pytest.skip("the random edits cancelled out")

    def scramble(old_count: int, new_count: int) -> tuple[str, str]:
        def one(count: int) -> str:
            return rng.choice(["", f",{rng.randint(0, 40)}", f",{count + rng.choice([-2, -1, 1, 3])}"])

        return one(old_count), one(new_count)

    scrambled = _rewrite_counts(original, scramble)
    assert repair_hunk_headers(scrambled) == original
    root = tmp_path / "ws"
    root.mkdir()
    (root / "f.py").write_text(old)
    apply_diff(scrambled, root, WorkspacePolicy(editable=["f.py"]))
    assert (root / "f.py").read_text() == new


# --------------------------------------------------------------------------- extraction


def test_extract_diff_from_messy_llm_answer_with_crlf_and_several_blocks(workspace: Path) -> None:
    first = unified(TRAIN, edited_train(), "train.py")
    second = unified(MODEL, MODEL.replace("64", "96"), "model.py")
    answer = (
        "Sure! Here is the implementation of the idea.\n\n"
        "First the training loop:\n\n```diff\n" + first + "```\n\n"
        "The final model looks like this:\n\n```python\nclass Model:\n    width = 96\n```\n\n"
        "And the model change:\n\n```patch\n" + second + "```\n\nLet me know if you need anything else.\n"
    ).replace("\n", "\r\n")
    assert extract_diff(answer) == first + second
    apply_diff(answer, workspace, POLICY)
    assert (workspace / "train.py").read_text() == edited_train()
    assert "width = 96" in (workspace / "model.py").read_text()


def test_extract_diff_without_fences_and_from_an_unclosed_fence() -> None:
    diff = unified(MODEL, MODEL.replace("64", "96"), "model.py")
    assert extract_diff("Here you go:\n" + diff) == diff
    assert extract_diff("Here you go:\n```diff\n" + diff) == diff
    assert extract_diff(diff) == diff
    with pytest.raises(NotADiff, match="empty or non-diff output"):
        extract_diff("   \n\n")


def test_prose_after_an_unfenced_diff_is_ignored(workspace: Path) -> None:
    diff = unified(MODEL, MODEL.replace("64", "96"), "model.py")
    apply_diff("Here you go:\n" + diff + "\nThis widens the model.\n", workspace, POLICY)
    assert "width = 96" in (workspace / "model.py").read_text()


# --------------------------------------------------------------------------- git environment


def test_applies_in_a_workspace_inside_a_git_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "model.py").write_text(MODEL)  # same name at the repository root: must stay as it is
    workspace = repo / "runs" / "trial 1" / "workspace"
    workspace.mkdir(parents=True)
    (workspace / "model.py").write_text(MODEL)
    # A caller's GIT_DIR/GIT_WORK_TREE would make git patch the repository root instead.
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(repo))
    apply_diff(unified(MODEL, MODEL.replace("64", "32"), "model.py"), workspace, POLICY)
    assert "width = 32" in (workspace / "model.py").read_text()
    assert (repo / "model.py").read_text() == MODEL


# --------------------------------------------------------------------------- parsing and globs


def test_parse_diff_reports_kinds_paths_and_hunks() -> None:
    diff = (
        unified(TRAIN, edited_train(), "train.py", n=1)
        + "--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1,2 @@\n+a\n+b\n"
        + "diff --git a/pkg/util.py b/pkg/util.py\ndeleted file mode 100644\n"
    )
    changes = parse_diff(diff)
    assert [(c.kind, c.old_path, c.new_path, len(c.hunks)) for c in changes] == [
        ("modify", "train.py", "train.py", 2),
        ("add", None, "pkg/new.py", 1),
        ("delete", "pkg/util.py", None, 0),
    ]
    assert changes[1].hunks[0].new_count == 2
    with pytest.raises(NotADiff, match="empty or non-diff output"):
        parse_diff("no diff here\n")


def test_path_matches_semantics() -> None:
    assert path_matches("train.py", ["train.py"])
    assert path_matches("pkg/a/b.py", ["pkg/**"])
    assert path_matches("pkg/a/b.py", ["**/*.py"])
    assert path_matches("b.py", ["**/*.py"])
    assert path_matches("data/x/y.bin", ["data"])  # a directory covers what is beneath it
    assert not path_matches("sub/train.py", ["*.py"])  # '*' stays within one component
    assert not path_matches("train.pyc", ["train.py"])
    assert path_matches("model_v2.py", ["model_v[0-9].py"])


# --------------------------------------------------------------------------- untrusted sizes

N = 200_000  # a quadratic step over this many characters takes many minutes (30,000 took 17 s)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("a/model.py\t2026-11-27 09:00:00.000000000 +0000", "model.py"),  # git diff / GNU diff -u
        ("a/model.py\t2026-11-27 09:00:00 -0800", "model.py"),
        ("a/model.py 2026-11-27 09:00:00.123 +0200", "model.py"),  # an LLM's space for the tab
        ("a/model.py  2026-11-27T09:00:00+0200", "model.py"),
        ("a/model.py 2026-11-27 09:00", "model.py"),
        ("a/model.py 2026-11-27 09:00:00 +0000   ", "model.py"),
        ("a/model.py\t", "model.py"),
        ("a/my file.py\t2026-11-27 09:00:00 +0000", "my file.py"),
        ("a/my file.py 2026-11-27 09:00:00", "my file.py"),
        ("a/2026-11-27 09:00.py", "2026-11-27 09:00.py"),  # not a timestamp: it is not at the end
        ("a/runs 2026-11-27", "runs 2026-11-27"),  # a date alone is no timestamp
    ],
)
def test_file_headers_lose_their_timestamp_and_nothing_else(header: str, name: str) -> None:
    old = header.replace("a/", "b/", 1) if header.startswith("a/") else header
    diff = f"--- {header}\n+++ {old}\n@@ -1 +1 @@\n-x\n+y\n"
    assert [change.path for change in parse_diff(diff)] == [name]


@pytest.mark.timeout(15)  # quadratic parsing of these lines would take minutes, linear parsing 0.1 s
@pytest.mark.parametrize(
    "header",
    [
        "--- a/model.py" + " " * N + "2026-11-27 09:00:00 +0000\n+++ b/model.py\n",
        "--- a/model.py\n+++ b/model.py" + " " * N + "\t2026-11-27 09:00:00\n",
        "diff --git a/model.py" + " " * 5 * N + "b/model.py\n--- a/model.py\n+++ b/model.py\n",
    ],
    ids=["spaces before a timestamp", "spaces before a tab", "spaces in a git line"],
)
def test_a_header_with_a_long_run_of_spaces_is_parsed_and_applies(workspace: Path, header: str) -> None:
    diff = header + "@@ -1,2 +1,2 @@\n class Model:\n-    width = 64\n+    width = 80\n"
    canonical = apply_diff(diff, workspace, POLICY)
    assert canonical.startswith("diff --git a/model.py b/model.py\n")
    assert "width = 80" in (workspace / "model.py").read_text()


@pytest.mark.timeout(15)
@pytest.mark.parametrize(
    ("diff", "error", "message"),
    [
        ("Binary files " + " and" * N + " differ\n", PatchFailed, "old name .* and new name 'and' differ"),
        ("Binary files a/x" + " and" * N + "\n", NotADiff, "no unified diff found"),
        (
            "--- a/model.py" + " " * N + "x\n+++ b/model.py\n@@ -1 +1 @@\n-a\n+b\n",
            PatchFailed,
            "old name .* differ",
        ),
        (
            "--- a/model.py\n+++ b/model.py" + " " * N + "2026\n@@ -1 +1 @@\n-a\n+b\n",
            PatchFailed,
            "old name .* differ",
        ),
        ("--- a/model.py\n+++ b/model.py\n@@ -1 +1" + " " * N + "x\n-a\n+b\n", PatchFailed, "malformed hunk"),
        (
            "--- a/" + "pkg/" * N + "x.py\n+++ b/" + "pkg/" * N + "x.py\n@@ -1 +1 @@\n-a\n+b\n",
            PatchRejected,
            "paths longer than 4096 bytes are not allowed",
        ),
        (
            "--- a/pkg/" + "x" * 300 + ".py\n+++ b/pkg/" + "x" * 300 + ".py\n@@ -1 +1 @@\n-a\n+b\n",
            PatchRejected,
            "path components longer than 255 bytes are not allowed",
        ),
    ],
    ids=[
        "binary line of ands",
        "binary line without an end",
        "spaces before a name",
        "spaces before a year",
        "spaces in a hunk header",
        "a deep path",
        "a long name",
    ],
)
def test_pathological_lines_fail_fast_with_a_short_reason(
    workspace: Path, diff: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as failure:
        apply_diff(diff, workspace, WorkspacePolicy(editable=("**/*.py", "pkg/**/**/*.py")))
    assert len(str(failure.value)) < 4000  # the line is quoted, but cut short


@pytest.mark.timeout(15)
def test_globs_match_component_by_component_in_linear_time() -> None:
    deep = "pkg/" * N + "x.py"
    assert path_matches(deep, ["pkg/**/**/*.py"]) and not path_matches(deep, ["**/*.pyc", "pkg/**/y/**"])
    assert not path_matches("a" * N + ".pyc", ["*a*a*a*a*a*.py"])
    assert path_matches("pkg/x.py", ["pkg/**/x.py"]) and not path_matches("pkg", ["pkg/**"])
    assert not path_matches("x.py", [""]) and path_matches("x.py", ["**"])


def test_answers_over_the_size_limit_are_rejected_with_the_limit_named() -> None:
    check_answer_size("x" * MAX_ANSWER_CHARS)
    with pytest.raises(PatchRejected, match=f"over the limit of {MAX_ANSWER_CHARS:,}"):
        check_answer_size("x" * (MAX_ANSWER_CHARS + 1))
