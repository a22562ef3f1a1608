"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh namespace, in a temporary
working directory, so a later block may use what an earlier one defined and
files they write go nowhere else. A block right after an HTML comment
`<!-- skip: REASON -->` (needs a download, a GPU, several devices, or the
`keras-distill[pretrained]` checkpoints) is not run. Bash blocks and
untagged blocks are never run. Relative links between the documents must
point at files that exist.
"""

import re
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def code_blocks(path):
    """`(line, language, source, skip_reason)` for each fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    previous = ""
    while i < len(lines):
        stripped = lines[i].strip()
        match = FENCE.match(stripped)
        if match is None:
            if stripped:
                previous = stripped
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        start = i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start}: unclosed code block")
        source = "\n".join(line[indent:] for line in lines[start:i])
        skip = SKIP.match(previous)
        blocks.append((start, match.group(1), source, skip and skip.group(1)))
        previous = ""
        i += 1
    return blocks


def python_documents():
    return [
        path for path in DOCUMENTS
        if any(language == "python" for _, language, _, _ in code_blocks(path))
    ]


def test_documents_exist():
    names = {path.name for path in DOCUMENTS}
    assert "README.md" in names and len(names) > 1


def test_readme_quick_start_is_executed():
    runnable = [
        block for block in code_blocks(ROOT / "README.md")
        if block[1] == "python" and block[3] is None
    ]
    assert runnable, "the README's quick start must be a runnable python block"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    missing = [
        target for target in LINK.findall(text)
        if "://" not in target and not target.startswith("mailto:")
        and not (path.parent / target).exists()
    ]
    assert not missing, f"{path.name} links to missing files: {missing}"


@pytest.fixture
def clean_keras_state():
    """Undoes the global settings a guide's block may change.

    On torch the blocks run with one intra-op thread: their models are tiny,
    and on shared, busy cores torch's default threads make each step several
    times slower (the quick start: 14 s instead of 5 s).
    """
    policy = keras.config.dtype_policy()
    threads = None
    if keras.backend.backend() == "torch":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    yield
    if threads is not None:
        torch.set_num_threads(threads)
    keras.config.set_dtype_policy(policy)
    keras.distribution.set_distribution(None)
    keras.utils.clear_session()


@pytest.mark.parametrize("path", python_documents(), ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch, clean_keras_state):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    ran = 0
    for line, language, source, skip in code_blocks(path):
        if language != "python" or skip:
            continue
        code = compile(source, f"{path.relative_to(ROOT)}:{line}", "exec")
        exec(code, namespace)  # noqa: S102 - the documents' own examples
        ran += 1
    if ran == 0:
        pytest.skip(f"{path.name}: every python block is marked skip")
