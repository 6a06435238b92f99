"""Readers on other hosts read the ledger's snapshot: consistent while the driver writes, without
the writer's process, lock or WAL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from hpc_executor import ledger as ledger_module
from hpc_executor.ledger import LEDGER_FILE, SNAPSHOT_FILE, Ledger
from hpc_executor.types import Idea, Patch

WRITER = textwrap.dedent("""
    import sys
    from hpc_executor.ledger import Ledger
    from hpc_executor.types import Idea, Patch
    ledger = Ledger(sys.argv[1], create=True)
    for i in range(int(sys.argv[2])):
        with ledger.transaction():  # an idea and its patch land together: a reader sees both or neither
            ledger.add_idea(Idea(f"e0-{i:03d}", 0, f"idea {i}", "d"), slot=i)
            ledger.add_patch(Patch(f"e0-{i:03d}", "diff", "applied"))
        ledger.publish_snapshot()
""")
# The reader reads without the retries `load` adds for NFS (a file replaced under an open read):
# a snapshot written in place rather than replaced would show here as a torn or failed read.
READER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hpc_executor import ledger
    seen = []
    while not seen or seen[-1] < int(sys.argv[2]):
        frames = ledger._read_snapshot(Path(sys.argv[1]) / ledger.SNAPSHOT_FILE)
        ideas, patches = len(frames["ideas"]), len(frames["patches"])
        assert ideas == patches, f"a torn read: {ideas} ideas, {patches} patches"
        assert not seen or ideas >= seen[-1], f"went back in time: {seen[-1]} -> {ideas}"
        seen.append(ideas)
    print(len(set(seen)))
""")


def test_a_reader_in_another_process_reads_consistent_snapshots(tmp_path: Path) -> None:
    n = 150
    Ledger(tmp_path, create=True).publish_snapshot()  # an empty one, for the reader to start on
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n)])
    reader = subprocess.run([sys.executable, "-c", READER, str(tmp_path), str(n)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert writer.wait(timeout=300) == 0
    assert reader.returncode == 0, reader.stderr[-3000:]
    assert int(reader.stdout) > 2, "the reader saw the ledger grow while it was written"


def test_load_reads_the_snapshot_not_the_live_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    ledger.add_idea(Idea("e0-000", 0, "published", "d"), slot=0)
    ledger.add_patch(Patch("e0-000", "diff", "applied"))
    ledger.publish_snapshot()
    ledger.add_idea(Idea("e0-001", 0, "not yet published", "d"), slot=1)
    assert list(ledger_module.load(tmp_path)["ideas"].title) == ["published"]
    assert len(ledger_module.load(tmp_path, live=True)["ideas"]) == 2
    ledger.close()
    (tmp_path / LEDGER_FILE).rename(tmp_path / "elsewhere.sqlite")  # the reader needs only the snapshot
    assert list(ledger_module.load(tmp_path)["ideas"].title) == ["published"]
    assert not list(tmp_path.glob(f"{SNAPSHOT_FILE}-*")), "an immutable read leaves no -wal or -shm"
