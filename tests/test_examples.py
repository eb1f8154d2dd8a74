"""Every printed example answers: the curl calls `make demo` prints, the README's curl calls
against the demo, and the CLI's `--help` search examples, each run as printed over the bundled
fhir_fixtures/ (what `make demo` serves) and checked against its `# →` line: each quoted name
there must be among the resources the example gets back."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.fhir.flatten import flatten_resource

ROOT = Path(__file__).resolve().parent.parent
# the README and the docs it links to: an example moved into docs/ is still run as printed
README = "\n".join(p.read_text(encoding="utf-8") for p in
                   [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
ARROW = re.compile(r"#\s*(?:→|->)\s*(.*)")


def _expected(arrow: str) -> list[str]:
    names = re.findall(r'"([^"]+)"', arrow) or re.findall(r"'([^']+)'", arrow)
    assert names, f"the `# →` line names nothing to check: {arrow!r}"
    return names


def _demo_curls() -> list[tuple[str, str]]:
    """(URL, arrow) of each curl `make demo` prints, with its variables filled in."""
    values = dict(re.findall(r"^(\w+) \??:?= ?(.*)$", MAKEFILE, re.M))
    lines = [re.sub(r'^\s*@echo "\s*|"\s*$', "", line) for line in MAKEFILE.splitlines()
             if line.strip().startswith('@echo "')]
    found = []
    for line, after in zip(lines, lines[1:] + [""]):
        if line.startswith("curl"):
            url = shlex.split(line.replace("\\$$", "$"))[-1]
            for name, value in values.items():
                url = url.replace(f"$({name})", value.strip())
            found.append((url, ARROW.search(after).group(1) if ARROW.search(after) else ""))
    return found


def _readme_curls() -> list[tuple[str, str | None, str]]:
    """(URL, POST body or None, arrow) of each README curl that has a `# →` line."""
    found = []
    for match in re.finditer(r"^(curl [^\n]*(?:\n(?!#)[^\n]*)*?)\n# → ([^\n]*)", README, re.M):
        words = shlex.split(match.group(1).replace("\\$", "$"))
        body = words[words.index("-d") + 1] if "-d" in words else None
        url = next(w for w in words if w.startswith("http"))
        found.append((url, body, match.group(2)))
    return found


def _cli_searches() -> list[tuple[list[str], str]]:
    """(argv, arrow) of each `fhir-rerank search` example in the CLI's help texts and README."""
    from adapter.cli import build_parser

    parser = build_parser()
    texts = [parser.epilog or ""] + [p.epilog or "" for p in
                                     parser._subparsers._group_actions[0].choices.values()]
    texts.append(README)
    found = []
    for text in texts:
        lines = text.splitlines()
        for line, after in zip(lines, lines[1:] + [""]):
            if "fhir-rerank search " in line and ARROW.search(after):
                command = line.split("fhir-rerank search ", 1)[1].split(" #")[0]
                found.append((shlex.split(command), ARROW.search(after).group(1)))
    return found


@pytest.fixture(scope="module")
def demo():
    """The demo's answers: keyword order (the demo without weights serves BM25 order)."""
    return create_app(load_settings({"reranker": "none"}, env={})).test_client()


def _named(bundle: dict, names: list[str], top: int) -> None:
    matches = [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert matches, f"no matches: {json.dumps(bundle)[:500]}"
    texts = [flatten_resource(r) for r in matches[:top]]
    for name in names:
        assert any(name in t for t in texts), f"{name!r} not among the first {top}: " + \
            " | ".join(t.splitlines()[0] for t in texts)


def test_there_are_examples_to_check():
    assert len(_demo_curls()) == 2 and all(arrow for _, arrow in _demo_curls())
    assert len(_readme_curls()) >= 4 and len(_cli_searches()) >= 3


@pytest.mark.parametrize("url, arrow", _demo_curls())
def test_the_curls_make_demo_prints_answer(demo, url, arrow):
    resp = demo.get(urlsplit(url)._replace(scheme="", netloc="").geturl())
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    _named(resp.get_json(), _expected(arrow), top=3)


@pytest.mark.parametrize("url, body, arrow", _readme_curls())
def test_the_readme_curls_answer(demo, url, body, arrow):
    path = urlsplit(url)._replace(scheme="", netloc="").geturl()
    resp = demo.post(path, data=body, content_type="application/fhir+json") if body \
        else demo.get(path)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    bundle = resp.get_json()
    _named(bundle, _expected(arrow), top=6)
    if "only Conditions" in arrow:
        assert {e["resource"]["resourceType"] for e in bundle["entry"]
                if e["search"]["mode"] == "match"} == {"Condition"}


@pytest.mark.parametrize("argv, arrow", _cli_searches())
def test_the_cli_search_examples_answer(argv, arrow, capsys):
    from adapter.cli import main

    assert main(["search", *argv, "--reranker", "none", "--json"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    _named(bundle, _expected(arrow), top=5)


def test_the_rerank_example_file_exists_and_reads():
    from adapter.cli_output import read_documents

    assert "--docs docs/examples/notes.jsonl" in README
    ids, texts = read_documents(str(ROOT / "docs/examples/notes.jsonl"))
    assert len(ids) == 5 and any("asthma" in t.lower() for t in texts)


def test_the_fhir_server_command_is_given_with_what_installs_it():
    """`node tests/fhir_server/server.js` needs the npm packages `make node` installs
    (`make demo` does not): the README says so wherever it prints the command."""
    for match in re.finditer(r"[^\n]{0,40}node tests/fhir_server/server\.js", README):
        assert "make node &&" in match.group(0), match.group(0)
