"""What a session may change: the checks that keep an agent inside its search space and its writable paths.

`WorkspaceGuard` is the part of `SessionDriver` (daemon/sessions.py) that compares what a live agent left with
the run's best commit and the recorded run directory, puts back what it may not change, and records it as
`integrity.violated`: files outside the editable globs (`check_integrity`), text outside the regions in force
(`outside_regions`, daemon/space.py), the submitted commit (`snapshot`, which takes every fixed path from the
best commit, whatever a live process did since the check), and frozen/, program.md and the checkpoint when
the sandbox could not keep the agent out of them (`restore_run_dir`). The agent's processes may still be
running, so the workspace is read and written only by file descriptor (`read_tree`, `put_file`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rloopd.lab import matches
from rloopd.log import NewEvent
from rloopd.memory.rundir import CHECKPOINT, frozen_dest, materialize_frozen
from rloopd.runsocket import SubmitRefused
from rloopd.snapshots import Snapshots, TreeTooLarge, put_file, read_head, read_tree, tree_bytes
from rloopd.space import RegionError, has_markers, not_constants
from rloopd.space import check as check_regions
from rloopd.space import parse as parse_regions

if TYPE_CHECKING:
    from rloopd.home import Home
    from rloopd.lab import AgentConfig
    from rloopd.loop import Loop

MB = 1 << 20


class WorkspaceGuard:
    """Mixed into SessionDriver, which provides `loop`, `home`, `run_id`, `uid` (the agent's, or None), `cfg`
    (the lab's `[agent]`) and `dir` (the session's directory: its HOME, tmp and socket)."""

    loop: Loop
    home: Home
    run_id: str
    uid: int | None
    cfg: AgentConfig
    dir: Path

    # --- the session's disk ------------------------------------------------------------------------
    # RLIMIT_FSIZE bounds one file (`file_mb`), not how many: a live session's files in all are measured
    # while it runs (SessionDriver._watch) and the session is ended past `disk_mb`; what the daemon reads
    # whole (the workspace at a submit, notes.md) has caps of its own, so an agent cannot make it read or
    # commit gigabytes. Polling lets a session overshoot by what it writes between two looks (a tenth of
    # a second): on a shared disk, put the home on a filesystem of its own for a hard limit.

    def over_disk(self) -> str | None:
        """Why the live session must end for its disk use, or None."""
        cap = self.cfg.disk_mb * MB
        run_dir = self.loop.run_dir
        used = 0
        try:  # what the agent writes: not the daemon's checkpoint.pt and results.tsv beside its notes
            used += os.stat(run_dir / "memory" / "notes.md", follow_symlinks=False).st_size
        except OSError:
            pass
        for top in (run_dir / "workspace", run_dir / "memory" / "artifacts", self.dir / "home", self.dir / "tmp"):
            used += tree_bytes(top, stop_at=cap - used)
            if used > cap:
                return (f"the session's files passed [agent] disk_mb = {self.cfg.disk_mb} "
                        f"(workspace/, notes.md, artifacts/, its HOME and tmp): the session was ended")
        return None

    def check_workspace_size(self) -> None:
        """Refuse a submit whose workspace the daemon would have to read and commit whole above `workspace_mb`."""
        cap = self.cfg.workspace_mb * MB
        used = tree_bytes(self.loop.run_dir / "workspace", stop_at=cap)
        if used > cap:
            raise SubmitRefused(f"workspace/ holds more than [agent] workspace_mb = {self.cfg.workspace_mb} MB "
                                f"(.git included): remove what the experiment does not need, then submit again")

    def read_workspace(self, workspace: Path) -> dict[str, tuple[str, bytes]]:
        """The workspace's files, read no further than `workspace_mb` in all: a live process may grow a file
        after `check_workspace_size` looked, and the daemon must not read what it writes without end."""
        try:
            return read_tree(workspace, max_bytes=self.cfg.workspace_mb * MB)
        except TreeTooLarge:
            raise SubmitRefused(f"workspace/ grew past [agent] workspace_mb = {self.cfg.workspace_mb} MB while "
                                f"the daemon read it: remove what the experiment does not need") from None

    def reset_oversized_workspace(self) -> None:
        """At a session's end, a workspace above `workspace_mb` goes back to the best commit whole (an agent's
        own `.git` too, which restores otherwise keep), before anything reads it; recorded."""
        workspace = self.loop.run_dir / "workspace"
        cap = self.cfg.workspace_mb * MB
        if tree_bytes(workspace, stop_at=cap) <= cap:
            return
        put_file(workspace, ".git", None)
        self.home.snapshots.restore(self.loop.state.best_commit or self.loop.state.base_commit, workspace)
        self.loop.append(NewEvent("integrity.violated", {
            "step": None, "paths": ["workspace/"], "reverted": True,
            "found": f"workspace/ over [agent] workspace_mb = {self.cfg.workspace_mb} MB at the session's end; "
                     f"put back to the best commit whole"}))

    def read_notes(self, memory: Path) -> tuple[str, bytes] | None:
        """memory/notes.md as (git mode, bytes), cut at `notes_mb` (recorded) so the daemon never reads more."""
        found = read_tree(memory, only="notes.md", contents=False).get("notes.md")
        if found is None or found[0] == "120000":
            return found
        cap = int(self.cfg.notes_mb * MB)
        data = read_head(memory, "notes.md", cap + 1)
        if data is None:
            return None  # swapped for a link or removed since: nothing to capture this time
        if len(data) > cap:
            data = data[:cap]
            put_file(memory, "notes.md", data, uid=self.uid)
            self.loop.append(NewEvent("integrity.violated", {
                "step": None, "paths": ["memory/notes.md"], "reverted": True,
                "found": f"memory/notes.md over [agent] notes_mb = {self.cfg.notes_mb:g} MB; cut there"}))
        return found[0], data

    def snapshot(self, workspace: Path, step: int, text: str) -> str:
        """The submitted commit: the workspace's editable files, and the best commit's for every other path.
        `check_integrity` put those back just before, but a live process may change one again before the
        snapshot reads it: whatever it did, the experiment never runs on it (and it is recorded)."""
        loop, snaps = self.loop, self.home.snapshots
        best = loop.state.best_commit or loop.state.base_commit
        files, recorded = self.read_workspace(workspace), snaps.ls(best)
        narrowed = self.outside_regions(best, files)  # region-bound files take the best commit's fixed parts
        for rel, (_, data) in narrowed.items():
            if data is None:
                files.pop(rel, None)
            else:
                files[rel] = (recorded[rel][0] if rel in recorded else "100644", data)
        found = snaps.entries_of(files)
        editable = {p: e for p, e in found.items() if matches(loop.lab.editable, f"workspace/{p}")}
        fixed = {p: e for p, e in recorded.items() if not matches(loop.lab.editable, f"workspace/{p}")}
        sneaked = sorted(p for p in set(found) - set(editable) if found[p] != recorded.get(p))
        sneaked += sorted(p for p in set(fixed) - set(found)) + sorted(narrowed)
        if sneaked:
            loop.append(NewEvent("integrity.violated", {
                "step": step, "paths": [f"workspace/{p}" for p in sneaked], "reverted": True,
                "found": "files outside the editable globs or regions changed while the submit was being made"}))
        return snaps.commit_entries(editable | fixed, run=self.run_id, ref=f"s{step}-a0", message=text,
                                    parent=loop.state.best_commit)

    def check_integrity(self, step: int | None) -> None:
        """Files of the workspace outside the editable globs that differ from the best commit (changed, added,
        deleted, a mode or a link) are put back and recorded. The agent's processes may still run, so the
        workspace is read and written only by file descriptor (`read_tree`, `put_file`): no link it plants
        can steer the daemon's reads or writes outside the tree."""
        loop = self.loop
        workspace = loop.run_dir / "workspace"
        best = loop.state.best_commit or loop.state.base_commit
        recorded = self.home.snapshots.ls(best)
        current = self.read_workspace(workspace)
        outside = []
        for rel in sorted(set(recorded) | set(current)):
            if matches(loop.lab.editable, f"workspace/{rel}"):
                continue
            have, want = current.get(rel), recorded.get(rel)
            if have is None or want is None or have[0] != want[0] or Snapshots.blob_sha(have[1]) != want[1]:
                outside.append(rel)
        if outside:
            for rel in sorted(outside, key=lambda r: r in recorded):  # removals first, then what the commit holds
                want = recorded.get(rel)
                data = self.home.snapshots.read(best, rel) if want else None
                put_file(workspace, rel, data, mode=0o755 if want and want[0] == "100755" else 0o644,
                         uid=self.uid, link=bool(want and want[0] == "120000"))
            loop.append(NewEvent("integrity.violated", {"step": step, "paths": [f"workspace/{r}" for r in outside],
                                                        "found": "files outside the editable globs changed",
                                                        "reverted": True}))
        narrowed = self.outside_regions(best, current)
        if narrowed:  # edits inside the regions are kept; the rest of the file is the best commit's
            for rel, (_, data) in narrowed.items():
                want = recorded.get(rel)
                put_file(workspace, rel, data, mode=0o755 if want and want[0] == "100755" else 0o644, uid=self.uid)
            loop.append(NewEvent("integrity.violated", {
                "step": step, "paths": [f"workspace/{r}" for r in narrowed], "reverted": True,
                "found": "; ".join(f"workspace/{r}: {found}" for r, (found, _) in narrowed.items())}))

    def outside_regions(self, best: str, current: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes | None]]:
        """Editable files that break the search space's regions: {path: (what was found, the bytes to keep, or
        None to remove the file)}. Under a space with `regions`:
        - a file the best commit marks may change only inside the regions in force (and under `constants`,
          only `NAME = literal` lines there), keeping its mode; the rest is the best commit's;
        - any file (a new one too) whose region markers do not parse goes back to the best commit's version
          (or away), so an accepted commit never holds markers a later check could not read."""
        lab = self.loop.lab
        if lab.regions is False:
            return {}
        snaps = self.home.snapshots
        recorded = snaps.ls(best)
        out: dict[str, tuple[str, bytes | None]] = {}
        for rel in sorted(set(recorded) | set(current)):
            want, have = recorded.get(rel), current.get(rel)
            links = want is not None and want[0] == "120000" or have is not None and have[0] == "120000"
            if links or not matches(lab.editable, f"workspace/{rel}"):
                continue
            old = snaps.read(best, rel) if want else None
            new = have[1] if have else None
            if new == old and (have is None or have[0] == want[0]):
                continue
            try:
                marked = old is not None and bool(parse_regions(old))
            except RegionError:
                marked = False  # recorded before markers were checked: the file is editable whole
            if not marked:
                if new is not None and has_markers(new):
                    try:
                        parse_regions(new)
                    except RegionError as e:
                        out[rel] = (f"its region markers do not parse ({e})", old)
                continue
            checked = check_regions(old, new, lab.regions)
            if not checked.ok:
                out[rel] = (checked.found, checked.data)
            elif lab.constants and (problem := not_constants(new, lab.regions)):
                out[rel] = (problem, old)
            elif have[0] != want[0]:
                out[rel] = ("its mode changed", new)
        return out

    def restore_run_dir(self, n: int) -> None:
        """Without bubblewrap an agent can write outside its paths: put frozen/ and program.md back."""
        loop = self.loop
        run_dir = loop.run_dir
        bad = []
        for entry in loop.created.get("manifest", []):
            if entry["role"] != "frozen" or not entry.get("blob"):
                continue
            dest = frozen_dest(run_dir, entry["path"])
            if not dest.is_file() or hashlib.sha256(dest.read_bytes()).hexdigest() != entry["sha256"]:
                bad.append(dest.relative_to(run_dir).as_posix())
        program = run_dir / "program.md"
        if loop.state.program_blob and (not program.is_file() or
                                        hashlib.sha256(program.read_bytes()).hexdigest() != loop.state.program_blob):
            bad.append("program.md")
        checkpoint = run_dir / "memory" / CHECKPOINT
        if loop.fold.mem.shown_checkpoint and checkpoint.is_file() and \
                hashlib.sha256(checkpoint.read_bytes()).hexdigest() != loop.fold.mem.shown_checkpoint:
            bad.append(f"memory/{CHECKPOINT}")
        if not bad:
            return
        for rel in bad:
            target = run_dir / rel
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        materialize_frozen(run_dir, loop.created["manifest"], self.home.blobs)
        loop.written.clear()
        loop.project()
        loop.append(NewEvent("integrity.violated", {"step": None, "paths": bad, "reverted": True,
                                                    "found": f"session {n} changed files it may only read"}))
