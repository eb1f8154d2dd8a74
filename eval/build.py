"""Build the in-repo judged sets' topics.json and qrels.txt from their questions.tsv.

Each row of `questions.tsv` is a question about one patient and the codes that answer it
(the rule of ../shared/eval: a resource is relevant when one of its `code.coding` codes is in
the question's list; everything else is unjudged and counts as not relevant). The records
are read from `fhir_fixtures/`, so the judgments follow the data exactly.

    python eval/build.py            # rewrite every set's topics.json + qrels.txt
    python eval/build.py --check    # exit 1 when a committed file differs (tests use this)
    python eval/build.py --copy-shared ../shared/eval   # refresh eval/no-notes/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {  # set folder → FHIR data folder its questions are asked over
    "notes-heavy": ROOT / "fhir_fixtures" / "synthea-bulk",
}
# The no-notes set is the shared development set (CC0) cut to the three fixture patients:
# copied by `python eval/build.py --copy-shared PATH/TO/shared/eval`, not built from codes.
NO_NOTES_PATIENTS = ("b3166d04-e777-4bbf-97fb-b1f0b49ec35d", "720b9118-3153-40c8-b162-cd963506be0e",
                     "ec6a274e-5090-45c9-b153-e40418f6fa3d")
TYPES = ("Condition", "Observation")


def _resources(folder: Path):
    for path in sorted(folder.glob("*")):
        if path.suffix == ".ndjson":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("resourceType") == "Bundle":
                for entry in data.get("entry", []):
                    resource = entry.get("resource") or {}
                    if entry.get("fullUrl", "").startswith("urn:uuid:"):
                        resource = {**resource, "id": entry["fullUrl"][len("urn:uuid:"):]}
                    yield resource
            else:
                yield data


def _patient(resource: dict) -> str | None:
    ref = (resource.get("subject") or {}).get("reference", "")
    for prefix in ("Patient/", "urn:uuid:"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return None


def build(name: str) -> tuple[str, str]:
    """(topics.json text, qrels.txt text) for one set."""
    folder = ROOT / "eval" / name
    rows = [line.split("\t") for line in
            (folder / "questions.tsv").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    coded: dict[str, list[tuple[str, set[str]]]] = {}
    for resource in _resources(SETS[name]):
        if resource.get("resourceType") in TYPES and _patient(resource):
            codes = {c.get("code") for c in (resource.get("code") or {}).get("coding", [])}
            coded.setdefault(_patient(resource), []).append(
                (f"{resource['resourceType']}/{resource['id']}", codes))
    topics, qrels = [], []
    for qid, patient, question, codes in rows:
        wanted = set(codes.strip().split("|"))
        full = f"{qid}@{patient}"
        topics.append({"qid": full, "query": question, "patient": patient})
        hits = sorted(ref for ref, have in coded.get(patient, []) if have & wanted)
        if not hits:
            raise SystemExit(f"{name}/{qid}: no record of {patient} has any of {sorted(wanted)}")
        qrels.extend(f"{full} 0 {ref} 1" for ref in hits)
    about = (f"Judged questions over fhir_fixtures/{SETS[name].name}, built by eval/build.py "
             f"from eval/{name}/questions.tsv (see eval/README.md).")
    return (json.dumps({"about": about, "topics": topics}, indent=1, ensure_ascii=False) + "\n",
            "\n".join(qrels) + "\n")


def copy_shared(shared: Path) -> None:
    """eval/no-notes/: the shared dev set's topics and qrels for the fixture patients."""
    data = json.loads((shared / "topics.json").read_text(encoding="utf-8"))
    topics = [t for t in data["topics"] if t["patient"] in NO_NOTES_PATIENTS]
    qids = {t["qid"] for t in topics}
    qrels = [line for line in (shared / "qrels.txt").read_text(encoding="utf-8").splitlines()
             if line.split(" ", 1)[0] in qids]
    out = ROOT / "eval" / "no-notes"
    about = ("The shared development set's questions about the three patients of "
             "fhir_fixtures/synthea-r4-bundles, copied unchanged (CC0; see eval/README.md).")
    (out / "topics.json").write_text(json.dumps({"about": about, "topics": topics}, indent=1,
                                                ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "qrels.txt").write_text("\n".join(qrels) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--copy-shared"]:
        copy_shared(Path(argv[1]))
        return 0
    stale = []
    for name in SETS:
        topics, qrels = build(name)
        for filename, text in (("topics.json", topics), ("qrels.txt", qrels)):
            path = ROOT / "eval" / name / filename
            if "--check" in argv:
                if not path.is_file() or path.read_text(encoding="utf-8") != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                path.write_text(text, encoding="utf-8")
    if stale:
        print("stale (run python eval/build.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
