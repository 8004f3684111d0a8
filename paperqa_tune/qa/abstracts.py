"""Reading paper abstracts: JSONL, CSV or blank-line-separated text files, or the arXiv API. Each paper comes
back as {"id", "title", "abstract", "_where"} (extra fields kept), with chat markers removed from its text
(listed under "_chat_markers") and file:line in every error. Full-text PDFs: paperqa_tune/qa/fulltext.py."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from paperqa_tune.errors import InputError

from paperqa_tune.files import read_jsonl, resolve_path
from paperqa_tune.safety import chat_structure
from paperqa_tune.qa.textsim import clean_text


def decode_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:  # PermissionError and the like
        raise InputError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "re-save the file as UTF-8") from None


def strip_chat_markers(text: str) -> tuple[str, list[str]]:
    """`text` with every chat role marker and special token replaced by a space (its line breaks kept), and the
    markers it held."""
    found = []
    while (marker := chat_structure(text)) is not None:
        found.append(marker)
        text = text.replace(marker, " ")
    return text, found


def without_chat_markers(text: str) -> tuple[str, list[str]]:
    """`text` as one clean line without chat role markers or special tokens, and the markers it held. Abstracts go
    into the generation prompt and into eval questions' `context`, where a marker would act as a turn boundary."""
    text, found = strip_chat_markers(text)
    return clean_text(text), found


def paper_record(path: Path | str, line: int | None, obj: dict, fallback_id: str) -> dict:
    where = f"{path}:{line}" if line is not None else str(path)
    abstract = obj.get("abstract")
    if abstract is None:
        raise InputError(f"{where}: no 'abstract' field; each record needs "
                         "{\"id\", \"title\", \"abstract\"}")
    if not isinstance(abstract, str) or not abstract.strip():
        raise InputError(f"{where}: empty abstract (it must be non-empty text); fill it in or delete that record")
    abstract, markers = without_chat_markers(abstract)
    title, in_title = without_chat_markers(clean_text(obj.get("title")))
    if not abstract:
        raise InputError(f"{where}: the abstract holds nothing but chat markers ({', '.join(markers)}); fill it in "
                         "or delete that record")
    pid = obj.get("id")
    pid = fallback_id if pid is None or str(pid).strip() == "" else str(pid).strip()
    paper = {**obj, "id": pid, "title": title, "abstract": abstract, "_where": where}
    if markers or in_title:
        paper["_chat_markers"] = sorted(set(markers + in_title))
    return paper


INPUT_SUFFIXES = (".pdf", ".jsonl", ".csv", ".txt")  # what a folder given to --input contributes


def input_files(paths: list[str], skip: set[Path] = frozenset()) -> list[Path]:
    """`paths` with each folder replaced by the .pdf/.jsonl/.csv/.txt files directly in it, sorted by name; files
    in a folder whose resolved path is in `skip` (the run's own outputs) are left out. Other paths are returned as
    given: their readers name what is wrong with them."""
    files = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            files.append(path)
            continue
        found = folder_inputs(path, skip)
        if not found:
            raise InputError(f"{path}: the folder holds no {'/'.join(INPUT_SUFFIXES)} file (subfolders are not "
                             "searched); put the papers there or name the files")
        files += found
    return files


def folder_inputs(folder: Path, skip: set[Path] = frozenset()) -> list[Path]:
    """The files with an input suffix directly in `folder`, sorted by name, but those whose resolved path is in
    `skip`. A link among them that leads nowhere (it loops, or its target is gone) is InputError naming it:
    skipping it would drop papers without a word."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in INPUT_SUFFIXES)
    except OSError as e:
        raise InputError(f"{folder}: cannot list the folder ({e.strerror or e}); check its permissions") from None
    entries = [p for p in entries if resolve_path(p, "--input") not in skip]
    for p in entries:
        if p.is_symlink() and not p.exists():  # exists() follows the link: False for a loop or a missing target
            resolve_path(p, "--input")  # a loop: said so
            raise InputError(f"--input {p}: a symbolic link to {p.readlink()}, which does not exist; fix the link "
                             f"or remove it from {folder}")
    return [p for p in entries if p.is_file()]


def read_abstract_file(path: Path) -> list[dict]:
    """JSONL ({"id","title","abstract"}, extra keys kept), CSV with those columns, or blank-line-separated text.
    A folder is refused (name its files: --input DIR/*.jsonl), as is a file with no abstract in it."""
    resolve_path(path, "--input")  # a looping link: said so (exists() below would call it missing)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the files in it, e.g. --input {path}/*.jsonl")
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a pipe or a device); save the abstracts to a file first")
    papers = read_papers(path)
    if not papers:
        raise InputError(f"{path}: no abstracts in it (the file is empty, or holds only blank lines or a header); "
                         "fill it in or leave it out of --input")
    return papers


def read_papers(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return [paper_record(path, ln, obj, f"{path.stem}-{ln}") for ln, obj in read_jsonl(path)]
    if suffix == ".csv":
        text = decode_file(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "abstract" not in columns:
            raise InputError(f"{path}:1: unknown CSV columns {columns or '(none)'}; the header needs an "
                             "'abstract' column (and optionally 'id' and 'title')")
        reader.fieldnames = columns
        papers, start = [], 2
        for row in reader:
            if None in row:
                raise InputError(f"{path}:{start}: more fields than the header has columns; quote fields "
                                 "that contain commas")
            if any((v or "").strip() for v in row.values()):
                papers.append(paper_record(path, start, row, f"{path.stem}-{start}"))
            start = reader.line_num + 1
        return papers
    if suffix in (".txt", ".text", ".md"):
        text = decode_file(path)
        papers, block, block_line = [], [], 0
        for ln, line in enumerate(text.splitlines() + [""], 1):
            if line.strip():
                if not block:
                    block_line = ln
                block.append(line)
            elif block:
                papers.append(paper_record(path, block_line, {"abstract": " ".join(block)},
                                           f"{path.stem}-{len(papers) + 1}"))
                block = []
        return papers
    raise InputError(f"{path}: unknown input type {suffix or '(no suffix)'}; use .pdf, .jsonl, .csv or .txt "
                     "(blank-line-separated abstracts)")


def http_session(timeout: float = 30.0):
    """A requests session whose every request has `timeout` unless the call sets its own: the arxiv client sets
    none, and a dead connection must not hang the run. The arXiv API and the PDF downloads share it."""
    import requests

    class _Session(requests.Session):
        def request(self, *a, **kw):
            kw.setdefault("timeout", timeout)
            return super().request(*a, **kw)

    return _Session()


def fetch_arxiv(ids: list[str], query: str | None, max_papers: int, api_url: str, session=None,
                delay: float = 3.0) -> list[dict]:
    """Abstracts from the arXiv API through the `arxiv` client (its paging, rate limit and retries), over `session`
    (default: a new http_session()), `delay` seconds apart (arXiv asks for 3)."""
    import arxiv
    import requests

    client = arxiv.Client(page_size=min(100, max(len(ids), max_papers)), delay_seconds=delay, num_retries=2)
    client.query_url_format = api_url + "?{}"  # class attribute in arxiv 4.x; the tests point it at loopback
    client._session = session if session is not None else http_session()
    search = arxiv.Search(query=query or "", id_list=ids, max_results=len(ids) if ids and not query else max_papers)
    try:
        results = list(client.results(search))
    except (arxiv.ArxivError, requests.RequestException) as e:
        raise InputError(f"arXiv API ({api_url}): {e}; check the network, the ids/query, or --arxiv_api_url") from None
    papers, returned = [], set()
    for r in results:
        pid = re.sub(r"v\d+$", "", r.get_short_id())
        returned.add(pid)
        if clean_text(r.summary):
            papers.append(paper_record(f"arXiv {pid}", None, {"id": pid, "title": r.title, "abstract": r.summary,
                                                        "categories": " ".join(r.categories), "source": "arxiv"}, pid))
    if ids:
        missing = [i for i in ids if re.sub(r"v\d+$", "", i) not in returned]
        if missing:
            raise InputError(f"arXiv returned no paper for id(s) {', '.join(missing)}; check them on arxiv.org")
    return papers
