"""What the tests that start Ray clusters share (tests/tune/test_cluster_cli.py, `ray start`; tests/test_ray_up.py,
`ray up`): finding a cluster's processes, and reading the commands the README shows for it. Free ports come from
`cube_ray.cli.free_ports`, which init_ray uses too."""
from __future__ import annotations

import os
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def processes_of(root: Path) -> list[int]:
    """PIDs of a cluster's processes: those whose environment or command line names its folder (every process a test's
    cluster starts inherits a variable naming it, e.g. RAY_AUTH_TOKEN_PATH=<root>/auth_token; Ray's workers rename
    their command line)."""
    found, marker = [], str(root).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes() or marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def words(text: str) -> str:
    """Shell text as one line of single-spaced words, `\\`-continued lines joined."""
    return " ".join(text.replace("\\\n", " ").split())


def readme_commands(heading: str) -> str:
    """The first ```bash block after `heading` in README.md, comments (two spaces, then #) dropped, as words()."""
    text = README.read_text()
    section = text[text.index(heading):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("\n```", start)]
    return words("\n".join(line.split("  #")[0] for line in block.splitlines()))
