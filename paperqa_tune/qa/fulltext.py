"""Full-text papers from PDF: the text layer read with pypdf, page furniture (running headers, page numbers, the
arXiv side stamp) removed, line breaks and hyphenated words joined, and the text split into sections (abstract,
introduction, method, ..., conclusion) with the references, acknowledgements and appendices left out. Sections
longer than `max_chars` are cut at paragraph, then sentence boundaries.

A PDF that cannot give text is refused with PdfRejected, whose message starts with the kind of failure:
`pdf_encrypted:`, `pdf_no_text:` (scanned pages, no text layer), `pdf_unreadable:` (truncated, corrupt, not a
PDF) or, for downloads, `pdf_download:`. Callers record it as a reject and go on with the other papers."""
from __future__ import annotations

import io
import logging
import math
import re
import sys
import time
import unicodedata
from pathlib import Path

from paperqa_tune.errors import InputError
from paperqa_tune.qa.abstracts import paper_record, strip_chat_markers
from paperqa_tune.qa.textsim import clean_text

MIN_LETTERS = 200  # fewer letters in the whole text layer than a short abstract has: scanned, or empty
MAX_PDF_BYTES = 100 * 2**20  # arXiv's own limit is 50 MB; anything larger is not a paper
OCR_HINT = "it looks scanned; run OCR on it first (e.g. ocrmypdf in.pdf out.pdf) and pass the result"

# Canonical section names, matched against a heading's words; the keyword found earliest in the heading wins,
# so "Experiments and Results" is experiments and "Results and Discussion" is results.
SECTION_KEYWORDS = (
    ("abstract", r"abstract"),
    ("introduction", r"introduction"),
    ("related_work", r"(?:related|prior|previous) (?:work|research|literature)|literature (?:review|survey)"),
    ("background", r"background|preliminar\w*"),
    ("limitations", r"limitations?"),
    ("conclusion", r"conclu\w*|future work|summary"),
    ("discussion", r"discussion"),
    ("experiments", r"experiment\w*|evaluation|empirical|ablations?|benchmarks?|data ?sets?|setup"),
    ("results", r"results?|analysis|findings"),
    ("method", r"methods?|methodology|approach|model|architecture|framework|algorithm|proposed"),
)
# A line that is only one of these is a heading even without a number (the list is strict: body text must not
# match); numbered headings may say anything.
UNNUMBERED = re.compile(
    r"(?:abstract|introduction|related work|background|preliminaries|methods?|methodology|approach|experiments?|"
    r"experimental (?:setup|results|evaluation)|evaluation|results?(?: and discussion)?|discussion|"
    r"conclusions?(?: and future work)?|concluding remarks|limitations|broader impacts?|ethics statement|"
    r"future work|references|bibliography|acknowledge?ments?|appendix(?: [A-Z0-9]\b(?:[:.]? \S+){0,8})?|appendices|"
    r"supplementary materials?)", re.I)
DROP_REST = re.compile(r"appendix|appendices|supplementary material", re.I)  # everything after it is left out
REFERENCES = re.compile(r"references|bibliography|works cited", re.I)  # left out until the next known heading
ACKNOWLEDGEMENTS = re.compile(r"acknowledge?ments?", re.I)  # left out until the next heading
NUMBERED = re.compile(r"^(?P<num>\d{1,2})\.?\s*(?P<title>[A-Z][^\n]*)$")
ROMAN = re.compile(r"^(?P<num>[IVX]{1,5})\.\s+(?P<title>[A-Z][^\n]*)$")
SUBHEADING = re.compile(r"^\d{1,2}(?:\.\d{1,2}){1,3}\.?\s+[A-Z]")
# "Abstract—We ...", "Abstract: We ..."; with only a space between, just the all-capitals form ("Abstract Syntax
# Notation" is a title)
INLINE_ABSTRACT = re.compile(r"^(?:(?:Abstract|ABSTRACT|A BSTRACT)\s*[\u2014\u2013:.\-]\s*|(?:ABSTRACT|A BSTRACT)\s+)"
                             r"(?P<rest>[A-Z].*)$")
TOC_ENTRY = re.compile(r"(?:\.\s?){3,}\s*\d*$")  # a table of contents' dot leaders
ARXIV_STAMP = re.compile(r"^arXiv:\s*\d{4}\.\d{4,5}(?:v\d+)?\s*\[[\w.\-]+\]\s*\d{1,2}\s*[A-Z][a-z]{2}\s*\d{4}$")
PAGE_NUMBER = re.compile(r"^(?:page\s+)?\d{1,4}(?:\s*(?:/|of)\s*\d{1,4})?$|^[-\u2013\u2014]\s*\d{1,4}\s*[-\u2013\u2014]$|"
                         r"^[ivxlc]{1,6}$", re.I)
LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                           "\ufb05": "st", "\ufb06": "st", "\t": " ", "\r": "\n", "\f": "\n", "\u2028": "\n"})
ROMAN_VALUES = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10,
                "XI": 11, "XII": 12, "XIII": 13, "XIV": 14, "XV": 15}


class PdfRejected(Exception):
    """A PDF that gives no usable text; the message starts with the kind (pdf_encrypted: ...) and says what to do."""


# --------------------------------------------------------------------------- reading the text layer
def read_pdf(path: Path, max_chars: int) -> dict:
    """The paper in the PDF at `path` (its id is the file name's stem). Raises PdfRejected for a PDF without usable
    text, InputError when the file itself cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    return read_pdf_bytes(data, str(path), path.stem, max_chars)


def read_pdf_bytes(data: bytes, where: str, paper_id: str, max_chars: int) -> dict:
    """The paper in `data`: {"id", "title", "abstract", "_where", "source": "pdf", "pages", "sections"}, the
    sections as split_sections gives them. Raises PdfRejected."""
    pages, failed, meta_title, page1_title = _extract(data)
    if failed:
        print(f"note: {where}: {len(failed)} of {len(pages)} pages are damaged and left out ({'; '.join(failed[:3])})",
              file=sys.stderr)
    counted = [sum(c.isalpha() for c in p) for p in pages]
    if sum(counted) < MIN_LETTERS:
        raise PdfRejected(f"pdf_no_text: {sum(counted)} letters of text on {len(pages)} page(s); {OCR_HINT}")
    if len(pages) >= 3 and sum(n >= 50 for n in counted) < len(pages) / 2:
        raise PdfRejected(f"pdf_no_text: only {sum(n >= 50 for n in counted)} of {len(pages)} pages have text; "
                          f"{OCR_HINT}")
    lines = _without_furniture([p.split("\n") for p in pages])
    text = "\n".join(line for page in lines for line in page)
    sections = split_sections(text, max_chars)
    if not sections:
        raise PdfRejected(f"pdf_no_text: no text outside the references and appendices on {len(pages)} page(s)")
    markers = sorted({m for s in sections for m in s.pop("_chat_markers", [])})
    body = [s for s in sections if s["name"] == "abstract"] or sections[:1]
    abstract = " ".join(s["text"] for s in body)
    title = meta_title or page1_title or (text.strip().split("\n", 1)[0][:300])
    paper = paper_record(where, None, {"id": paper_id, "title": title, "abstract": abstract, "source": "pdf",
                                       "pages": len(pages), "sections": sections}, paper_id)
    if markers:
        paper["_chat_markers"] = sorted(set(paper.get("_chat_markers", [])) | set(markers))
    return paper


def _extract(data: bytes) -> tuple[list[str], list[str], str, str]:
    """(each page's text, the pages that could not be read and why, the metadata title if sensible, the
    largest-font text of page 1)."""
    if b"%PDF-" not in data[:1024]:
        kind = "an empty file" if not data.strip() else "HTML or XML (an error page?)" if data.lstrip()[:1] == b"<" \
            else f"a file that starts with {data[:16]!r}"
        raise PdfRejected(f"pdf_unreadable: not a PDF, {kind}")
    if b"%%EOF" not in data[-4096:]:
        raise PdfRejected(f"pdf_unreadable: truncated (no %%EOF end marker in its {len(data):,} bytes); the download "
                          "or copy was cut short: fetch it again")
    with _PypdfWarnings() as warned:  # what pypdf repaired while opening the file needs no word
        reader, meta_title = _open(data)
        pages, failed, runs = [], [], []
        for k in range(len(reader.pages)):
            warned.messages.clear()
            try:
                visitor = _font_visitor(runs) if k == 0 else None
                # upright text only: the arXiv stamp and rotated tables are not running text
                pages.append(_clean_chars(reader.pages[k].extract_text(orientations=(0,), visitor_text=visitor)))
            except Exception as e:  # a damaged page need not cost the paper (pypdf raises many kinds)
                failed.append(f"page {k + 1}: {type(e).__name__}")
                pages.append("")
                continue
            if warned.messages and not pages[-1].strip():  # pypdf gave up on a corrupt stream: not a figure page
                failed.append(f"page {k + 1}: {clean_text(warned.messages[0])[:80]}")
    if 2 * len(failed) >= len(pages):
        raise PdfRejected(f"pdf_unreadable: {len(failed)} of {len(pages)} pages are damaged ({'; '.join(failed[:3])})")
    return pages, failed, meta_title, _largest_text(runs)


def _open(data: bytes):
    """(a pypdf reader of `data`, decrypted when its user password is empty; the sensible metadata title)."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except DependencyError:
                raise PdfRejected("pdf_encrypted: AES-encrypted; install the cryptography package so pypdf can open "
                                  "it, or save a decrypted copy (qpdf --decrypt in.pdf out.pdf)") from None
            if not opened:
                raise PdfRejected("pdf_encrypted: it needs a password to open; save a copy without the password "
                                  "(qpdf --password=... --decrypt in.pdf out.pdf) and pass that")
        n = len(reader.pages)
        meta_title = _sensible_title((reader.metadata or {}).get("/Title"))
    except PdfRejected:
        raise
    except Exception as e:  # pypdf raises many kinds on a damaged file: PdfReadError, KeyError, ValueError, ...
        raise PdfRejected(f"pdf_unreadable: pypdf cannot parse it ({type(e).__name__}: {clean_text(e)[:200]})") from None
    if n == 0:
        raise PdfRejected("pdf_unreadable: the PDF has no pages")
    return reader, meta_title


class _PypdfWarnings(logging.Handler):
    """Within `with`: the warnings pypdf logs (it repairs what it can and logs what it could not) kept in
    .messages instead of printed, so that a damaged page is reported once, naming its file."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("pypdf").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("pypdf").removeHandler(self)


def _font_visitor(runs: list):
    """A pypdf visitor collecting (printed size, text) of upright text, to find the title by its size."""
    def visit(text, cm, tm, font_dict, font_size):
        a, b, c, d = (tm[0] * cm[0] + tm[1] * cm[2], tm[0] * cm[1] + tm[1] * cm[3],
                      tm[2] * cm[0] + tm[3] * cm[2], tm[2] * cm[1] + tm[3] * cm[3])
        if text.strip() and abs(b) < 1e-6 and abs(c) < 1e-6 and a > 0 and d > 0:
            runs.append((round(font_size * math.sqrt(a * d), 1), text))
    return visit


def _largest_text(runs: list) -> str:
    """The text set in the largest font on page 1 (the title, in nearly every paper template), or ""."""
    runs = [(size, t) for size, t in runs if not ARXIV_STAMP.match(t.strip())]
    if not runs:
        return ""
    top = max(size for size, _ in runs)
    return _sensible_title(" ".join(_clean_chars(t) for size, t in runs if size >= top - 0.5))


def _sensible_title(value) -> str:
    """`value` as a title, or "" when it is missing or a placeholder (a file name, "Untitled", "Microsoft Word - x")."""
    t = clean_text(_clean_chars(str(value))) if value else ""
    words = t.split()
    if not (2 <= len(words) <= 40) or sum(c.isalpha() for c in t) < len(t) / 2:
        return ""
    if re.search(r"\.(?:pdf|docx?|tex|dvi|ps|rtf)$|^microsoft \w+ -|^untitled|^arxiv:", t, re.I):
        return ""
    return t


def _clean_chars(text: str) -> str:
    """Plain text for a prompt: ligatures spelt out, odd spaces made spaces, control and format characters gone
    (soft hyphens, zero-width joiners, private-use glyphs), only newlines kept."""
    text = unicodedata.normalize("NFC", text.translate(LIGATURES))
    text = "".join(ch for ch in text if ch == "\n" or not unicodedata.category(ch).startswith("C"))
    return re.sub(r"[^\S\n]+", " ", text)


def _without_furniture(pages: list[list[str]]) -> list[list[str]]:
    """Pages' lines without page numbers and running headers/footers: lines among a page's first or last three
    that are a page number, or that recur (digits aside) at the edge of at least 40% of the pages."""
    pages = [[ln.strip() for ln in p if ln.strip() and not ARXIV_STAMP.match(ln.strip())] for p in pages]

    def key(line):
        return re.sub(r"\d+", "#", line.lower())

    def edges(p):
        return set(range(min(3, len(p)))) | set(range(max(0, len(p) - 3), len(p)))

    seen: dict[str, int] = {}
    for p in pages:
        for k in {key(p[i]) for i in edges(p)}:
            seen[k] = seen.get(k, 0) + 1
    recurring = {k for k, n in seen.items() if len(pages) >= 2 and n >= max(2, math.ceil(0.4 * len(pages)))}
    return [[ln for i, ln in enumerate(p) if not (i in edges(p) and (PAGE_NUMBER.match(ln) or key(ln) in recurring))]
            for p in pages]


# --------------------------------------------------------------------------- sections
def _canonical(heading: str) -> str:
    """The canonical name of a heading's section ("body" when no keyword says)."""
    words = heading.lower()
    found = []
    for name, pattern in SECTION_KEYWORDS:
        m = re.search(rf"\b(?:{pattern})\b", words)
        if m:
            found.append((m.start(), name))
    return min(found)[1] if found else "body"


def _unspaced(title: str) -> str:
    """Small-caps headings come out of some templates letter-spaced ("A BSTRACT", "R ELATED W ORK")."""
    if title.upper() == title:
        return re.sub(r"\b([A-Z]) (?=[A-Z]{2,})", r"\1", title)
    return title


def _heading(line: str, last_num: int, typical: int) -> tuple[str, str, int] | None:
    """(heading as printed, text after it on the line, its number or -1) when `line` is a section heading."""
    if len(line) > max(50, 0.8 * typical) or line.endswith((",", ";")) or TOC_ENTRY.search(line):
        return None
    plain = _unspaced(line.rstrip(":."))
    if UNNUMBERED.fullmatch(plain) and line[0].isupper():
        return plain, "", -1
    m = NUMBERED.match(line) or ROMAN.match(line)
    if not m or line.endswith("."):
        return None
    num = int(m["num"]) if m["num"].isdigit() else ROMAN_VALUES.get(m["num"], 0)
    title = _unspaced(m["title"].strip())
    words = title.split()
    if not (1 <= len(words) <= 12) or sum(c.isalpha() for c in title) < 0.6 * len(title.replace(" ", "")):
        return None
    known = _canonical(title) != "body" or UNNUMBERED.fullmatch(title)
    # Numbers must follow on (a wrapped body line can start "3 Results show ..."); a known name may skip one.
    if num == last_num + 1 or (known and last_num < num <= last_num + 3):
        return f"{m['num']} {title}", "", num
    return None


def _typical_line_length(lines: list[str]) -> int:
    lengths = sorted(len(ln) for ln in lines if ln)
    return lengths[int(0.8 * (len(lengths) - 1))] if lengths else 80


def split_sections(text: str, max_chars: int | None = None) -> list[dict]:
    """[{"name", "heading", "text"}] in reading order from a paper's text (lines as the PDF has them): "name" is
    canonical (abstract, introduction, related_work, background, method, experiments, results, discussion,
    conclusion, limitations; body for text under no recognised heading), "heading" as printed. Text before the
    first heading is a "body" section unless an abstract heading follows (then it is the title and authors, and
    left out). References, acknowledgements and appendices are left out. With `max_chars`, a longer section
    becomes several entries of at most that many characters, each with "part": 1, 2, ..."""
    lines = [ln.strip() for ln in text.split("\n")]
    typical = _typical_line_length(lines)
    current = {"name": "body", "heading": "", "lines": []}
    sections, last_num, mode = [current], 0, "keep"
    for line in lines:
        found = None
        if line and mode != "stop":
            found = _heading(line, last_num, typical)
            m = INLINE_ABSTRACT.match(line)
            if found is None and m and not any(s["name"] == "abstract" for s in sections) and last_num == 0:
                found = ("Abstract", m["rest"], -1)
        if found is None:
            if mode == "keep":
                current["lines"].append(line)
            continue
        heading, rest, num = found
        title = re.sub(r"^\S+\s+", "", heading) if num >= 0 else heading
        if mode == "references" and not UNNUMBERED.fullmatch(title):
            continue  # "5 Kingma, D. and Ba, J. Adam: A method ..." is a reference; "Methods" (Nature's) ends them
        last_num = max(last_num, num)
        if DROP_REST.match(title):
            mode = "stop"
        elif REFERENCES.fullmatch(title):
            mode = "references"
        elif ACKNOWLEDGEMENTS.fullmatch(title):
            mode = "skip"  # until the next heading
        else:
            mode = "keep"
            current = {"name": _canonical(title), "heading": heading, "lines": [rest] if rest else []}
            sections.append(current)
    if any(s["name"] == "abstract" for s in sections[1:]):
        sections = sections[1:]  # the title page's names and affiliations
    hyphenated = {w.lower() for w in re.findall(r"\b[A-Za-z]+-[A-Za-z]+\b", text)}
    out = []
    for s in sections:
        body, markers = strip_chat_markers(_paragraphs(s["lines"], typical, hyphenated))
        body = "\n".join(" ".join(p.split()) for p in body.split("\n") if p.strip())
        if not body:
            continue
        parts = split_long(body, max_chars) if max_chars else [body]
        for k, part in enumerate(parts, 1):
            entry = {"name": s["name"], "heading": s["heading"], "text": part}
            if len(parts) > 1:
                entry["part"] = k
            if markers:
                entry["_chat_markers"] = markers
            out.append(entry)
    return out


def _paragraphs(lines: list[str], typical: int, hyphenated: set[str]) -> str:
    """The lines joined into paragraphs, one per line: a short line that ends a sentence ends its paragraph, a
    subheading stands alone, and a word hyphenated across a line break is joined (keeping the hyphen when the
    paper spells the word with one elsewhere: "fine-tuning")."""
    paras: list[str] = []
    cur = ""
    for line in lines:
        if not line or SUBHEADING.match(line) and len(line) < 0.8 * typical:
            if cur:
                paras.append(cur)
            if line:
                paras.append(line)
            cur = ""
            continue
        if cur.endswith("-") and len(cur) > 1 and cur[-2].isalpha() and line[0].islower():
            left, right = re.search(r"([A-Za-z]+)-$", cur), re.match(r"[a-z]+", line)
            whole = f"{left[1]}-{right[0]}".lower() if left else ""
            cur = cur + line if whole in hyphenated else cur[:-1] + line
        else:
            cur = f"{cur} {line}" if cur else line
        if re.search(r"[.!?:][\"')\]\u201d]?$", line) and len(line) < 0.85 * typical:
            paras.append(cur)
            cur = ""
    if cur:
        paras.append(cur)
    return "\n".join(paras)


def split_long(text: str, max_chars: int) -> list[str]:
    """`text` cut into parts of at most `max_chars`: whole paragraphs (lines) where they fit, else whole sentences,
    else (a sentence longer than max_chars) at the last space before the limit."""
    units: list[tuple[str, str]] = []  # (joiner to the previous unit, text)
    for para in text.split("\n"):
        pieces = [para] if len(para) <= max_chars else re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])", para)
        for i, piece in enumerate(pieces):
            joiner = "\n" if i == 0 else " "
            while len(piece) > max_chars:
                cut = piece.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > 0 else max_chars
                units.append((joiner, piece[:cut].strip()))
                piece, joiner = piece[cut:].strip(), " "
            units.append((joiner, piece))
    parts, cur = [], ""
    for joiner, unit in units:
        if not unit:
            continue
        if cur and len(cur) + len(joiner) + len(unit) > max_chars:
            parts.append(cur)
            cur = ""
        cur = f"{cur}{joiner}{unit}" if cur else unit
    return parts + [cur] if cur else parts


# --------------------------------------------------------------------------- arXiv PDFs
def download_pdf(session, url: str, max_bytes: int = MAX_PDF_BYTES) -> bytes:
    """The bytes at `url`; raises PdfRejected("pdf_download: ...") on an HTTP error, a lost connection or a file
    larger than `max_bytes`."""
    import requests

    try:
        with session.get(url, stream=True) as r:
            if r.status_code != 200:
                raise PdfRejected(f"pdf_download: HTTP {r.status_code} from {url}")
            data = bytearray()
            for chunk in r.iter_content(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise PdfRejected(f"pdf_download: {url} is larger than {max_bytes // 2**20} MB")
            return bytes(data)
    except requests.RequestException as e:
        raise PdfRejected(f"pdf_download: {url}: {type(e).__name__}: {clean_text(e)[:200]}") from None


def add_full_texts(papers: list[dict], url_template: str, session, delay: float, max_chars: int
                   ) -> tuple[list[dict], list[dict]]:
    """(papers, rejects): each arXiv paper with the "sections" and "pages" of its PDF, fetched from
    url_template.format(id=...) one at a time `delay` seconds apart. A paper whose PDF fails keeps its API title
    and abstract, with no sections, and a reject says why; the API's title and abstract are kept in every case
    (they are cleaner than what a PDF's text layer gives)."""
    out, rejects = [], []
    for k, paper in enumerate(papers):
        url = url_template.format(id=paper["id"])
        if delay > 0:
            time.sleep(delay)  # arXiv's rule for automated access: one request at a time, 3 s apart
        try:
            got = read_pdf_bytes(download_pdf(session, url), url, paper["id"], max_chars)
        except PdfRejected as e:
            rejects.append({"paper_id": paper["id"], "stage": "input", "where": url,
                            "reason": f"{e}; kept its arXiv abstract without full text"})
            out.append(paper)
            print(f"full text {k + 1}/{len(papers)} {paper['id']}: {e}", file=sys.stderr)
            continue
        full = {**paper, "sections": got["sections"], "pages": got["pages"], "pdf_url": url}
        if "_chat_markers" in got:
            full["_chat_markers"] = sorted(set(paper.get("_chat_markers", [])) | set(got["_chat_markers"]))
        out.append(full)
        print(f"full text {k + 1}/{len(papers)} {paper['id']}: {got['pages']} pages, {len(got['sections'])} "
              "sections", file=sys.stderr)
    return out, rejects
