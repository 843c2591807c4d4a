"""tools/run_docs.py, which CI uses to run every shell block of README.md and docs/ as written: the real pages
parse, every block runs or is exempt for a reason that holds; the runner itself on made-up pages (order, failure,
exemptions, files written outside outputs/)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("run_docs", os.path.join(ROOT, "tools", "run_docs.py"))
run_docs = importlib.util.module_from_spec(spec)
sys.modules["run_docs"] = run_docs  # dataclasses look their module up there
spec.loader.exec_module(run_docs)


# ----------------------------------------------------------------------------- the real pages


def test_every_page_with_commands_is_covered():
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "*.md"], capture_output=True, text=True, check=True)
    markdown = set(tracked.stdout.split())
    pages = run_docs.pages()
    assert pages[0] == "README.md" and set(pages) <= markdown
    for page in markdown - set(pages):  # e.g. CHANGELOG.md: allowed only while it has no shell block
        assert not [b for b in run_docs.parse(page) if b.is_shell], f"{page} has shell blocks but is not run"


def test_every_shell_block_runs_or_is_exempt_for_a_reason_that_holds():
    blocks = run_docs.all_blocks()  # raises on a fence without a language or a malformed marker
    shell = [b for b in blocks if b.is_shell]
    assert run_docs.check_exemptions(blocks) == []
    assert all(b.arg for b in shell if b.kind == "skip")
    runs = [b for b in shell if b.kind in ("run", "setup")]
    assert len(runs) >= 10 and len(runs) > len(shell) / 2
    # README's demo is one of them: CI checks its accuracy in the clone
    demo = [b for b in runs if b.page == "README.md" and "python -m mmpretrain.train configs/demo.yaml" in b.commands()]
    assert len(demo) == 1


def test_commands_join_continuations_and_drop_comments():
    block = run_docs.Block("p.md", 1, "bash", "# a comment\npython -m x a \\\n    b  # why\n\nruff check . && ruff x")
    assert block.commands() == ["python -m x a b", "ruff check . && ruff x"]


# ----------------------------------------------------------------------------- the runner on made-up pages


def make_root(tmp_path, readme: str, ci: str = "pip install -e .\n") -> str:
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    (root / ".ci" / "run").write_text(ci)
    (root / "README.md").write_text(readme)
    (root / ".gitignore").write_text("outputs/\n")
    for page in ("launch/README.md", "CONTRIBUTING.md"):
        (root / page).parent.mkdir(exist_ok=True)
        (root / page).write_text("nothing to run\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pages"],
                   check=True)  # fmt: skip
    return str(root)


def fence(body: str, lang: str = "bash", marker: str = "") -> str:
    return (f"<!-- docs-run: {marker} -->\n" if marker else "") + f"```{lang}\n{body}\n```\n\ntext\n\n"


def test_blocks_run_in_order_in_one_folder_and_exempt_ones_do_not(tmp_path, capsys):
    readme = (
        fence("mkdir -p outputs && echo 1 > outputs/a")
        + fence("exit 3", marker="skip needs a cluster")
        + fence("pip install -e .", marker="runs-elsewhere")
        + fence("print('python blocks are not commands')", lang="python")
        + fence("test $(cat outputs/a) = 1 && echo 2 > outputs/b")
    )
    root = make_root(tmp_path, readme)
    blocks = run_docs.all_blocks(root)
    assert [b.kind for b in blocks] == ["run", "skip", "runs-elsewhere", "run", "run"]
    assert run_docs.check_exemptions(blocks, root) == []
    assert run_docs.run_blocks(blocks, root) == 0
    out = capsys.readouterr().out
    assert open(os.path.join(root, "outputs", "b")).read() == "2\n"
    assert "README.md:8  not run here: needs a cluster" in out
    assert "'pip install -e .' runs in .ci/run" in out
    assert "docs-run: 2 blocks ran, 2 exempt, all passed" in out


def test_a_failing_block_fails_the_run_naming_it_and_stops(tmp_path, capsys):
    readme = fence("echo ok") + fence("false\necho never") + fence("touch outputs/later")
    root = make_root(tmp_path, readme)
    assert run_docs.run_blocks(run_docs.all_blocks(root), root) == 1
    out = capsys.readouterr().out
    assert "docs-run: FAILED: the block at README.md:7 exited 1" in out and "never" not in out.splitlines()
    assert not os.path.exists(os.path.join(root, "outputs", "later"))


def test_files_written_outside_ignored_folders_fail_the_run(tmp_path, capsys):
    root = make_root(tmp_path, fence("mkdir -p reports && touch reports/web.png"))
    assert run_docs.run_blocks(run_docs.all_blocks(root), root) == 1
    assert "wrote where git does not ignore (examples write under outputs/): reports/web.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "readme, message",
    [
        ("```\nls\n```\n", "README.md:1: a fence without a language"),
        ("<!-- docs-run: skipp x -->\n```bash\nls\n```\n", "README.md:1: unknown docs-run marker"),
        ("<!-- docs-run: skip -->\n```bash\nls\n```\n", "README.md:1: docs-run: skip needs a reason"),
        ("<!-- docs-run: skip x -->\n```python\nx\n```\n", "a docs-run marker on a python block"),
        ("```bash\nls\n", "README.md:1: the block is not closed"),
    ],
)
def test_malformed_pages_are_refused(tmp_path, readme, message):
    root = make_root(tmp_path, readme)
    with pytest.raises(ValueError, match=message):
        run_docs.all_blocks(root)


def test_an_exemption_that_does_not_hold_is_reported(tmp_path):
    readme = fence("python -m pytest -q\nmmpretrain-train demo", marker="runs-elsewhere") + fence(
        "ls", marker="setup nothing-like-it"
    )
    root = make_root(tmp_path, readme, ci="python -m pytest -q -p no:cacheprovider\n")
    problems = run_docs.check_exemptions(run_docs.all_blocks(root), root)
    assert problems == [
        "README.md:2: docs-run: runs-elsewhere, but neither .ci/run nor a block that runs holds "
        "'mmpretrain-train demo'",
        "README.md:10: docs-run: setup nothing-like-it: no such setup (own-data)",
    ]
