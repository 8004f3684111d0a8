"""A small, honest PDF 1.4 writer for the tests: pages of text lines in the base-14 Helvetica fonts, optional image
pages (a grey picture and no text at all, as a scanner makes), an /Info title, and a correct cross-reference table,
so that pypdf reads the files the way it reads real papers. Also the bad variants the tests need: encrypted (by pypdf
itself), truncated, image-only."""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

PAGE_W, PAGE_H = 612, 792  # US Letter, in points
FONTS = {"F1": "Helvetica", "F2": "Helvetica-Bold"}


@dataclass
class Line:
    text: str
    size: float = 10.0
    bold: bool = False
    gap_before: float = 0.0  # extra points above the line (paragraph and heading spacing)
    y: float | None = None  # absolute baseline; None: below the previous line


@dataclass
class Image:
    width: int = 64
    height: int = 80


def _pdf_string(text: str) -> bytes:
    raw = text.encode("cp1252")  # WinAnsiEncoding, the encoding the font objects declare
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _content(items: list, compress: bool) -> tuple[bytes, bool]:
    """(content stream, uses the image) for one page; lines run from the top margin down."""
    ops, y, uses_image = [], PAGE_H - 72.0, False
    for it in items:
        if isinstance(it, Image):
            ops.append(b"q 432 0 0 540 90 126 cm /Im1 Do Q")
            uses_image = True
            continue
        y = it.y if it.y is not None else y - it.gap_before - it.size * 1.25
        font = "F2" if it.bold else "F1"
        ops.append(b"BT /%s %g Tf 1 0 0 1 72 %g Tm %s Tj ET" % (font.encode(), it.size, y, _pdf_string(it.text)))
    data = b"\n".join(ops) + b"\n"
    return (zlib.compress(data) if compress else data), uses_image


def make_pdf(pages: list[list], title: str | None = None, compress: bool = True) -> bytes:
    """A PDF whose page k shows pages[k]: Line items (text) and Image items (a grey picture)."""
    objs: list[bytes] = []  # objs[n - 1] is object n

    def add(body: bytes) -> int:
        objs.append(body)
        return len(objs)

    catalog = add(b"")  # filled in once the page tree's number is known
    fonts = {name: add(b"<< /Type /Font /Subtype /Type1 /BaseFont /%s /Encoding /WinAnsiEncoding >>" % base.encode())
             for name, base in FONTS.items()}
    font_res = b" ".join(b"/%s %d 0 R" % (n.encode(), num) for n, num in fonts.items())
    tree = len(objs) + 1
    add(b"")  # the page tree, filled in below
    kids = []
    for items in pages:
        stream, uses_image = _content(items, compress)
        flt = b" /Filter /FlateDecode" if compress else b""
        content = add(b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(stream), flt, stream))
        xobj = b""
        if uses_image:
            img = next(i for i in items if isinstance(i, Image))
            pixels = bytes((x * 3 + y * 5) % 256 for y in range(img.height) for x in range(img.width))
            num = add(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
                      b"/BitsPerComponent 8 /Length %d >>\nstream\n%s\nendstream"
                      % (img.width, img.height, len(pixels), pixels))
            xobj = b" /XObject << /Im1 %d 0 R >>" % num
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %d %d] /Resources << /Font << %s >>%s >> "
                        b"/Contents %d 0 R >>" % (tree, PAGE_W, PAGE_H, font_res, xobj, content)))
    objs[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % tree
    objs[tree - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    info = add(b"<< /Title %s /Producer (tests/pdf_maker.py) >>" % _pdf_string(title)) if title else None

    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")  # the binary comment line real writers add
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (n, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % off for off in offsets))
    trailer = b"/Size %d /Root %d 0 R" % (len(objs) + 1, catalog) + (b" /Info %d 0 R" % info if info else b"")
    out.write(b"trailer\n<< %s >>\nstartxref\n%d\n%%%%EOF\n" % (trailer, xref))
    return out.getvalue()


def encrypted(pdf: bytes, user_password: str = "secret") -> bytes:
    """`pdf` encrypted by pypdf (RC4-128, which pypdf reads without any crypto package); an empty user password
    gives a file anyone can open, as publishers' copy-protected PDFs are."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner-only", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def truncated(pdf: bytes, keep: float = 0.6) -> bytes:
    """The first `keep` share of the file, as an interrupted download leaves it."""
    return pdf[: int(len(pdf) * keep)]


def image_only(n_pages: int = 2) -> bytes:
    """Pages that hold a picture and no text, as a scanner without OCR makes them."""
    return make_pdf([[Image()] for _ in range(n_pages)], compress=False)


def paper_pages() -> list[list[Line]]:
    """A two-page paper: title, authors, Abstract, 1 Introduction (with a word hyphenated across a line break),
    2 Method (with a 2.1 subsection), 3 Results, 4 Conclusion, References, a running header and page numbers."""
    def head(text):
        return Line(text, 12, bold=True, gap_before=10)

    def foot(n):
        return Line(str(n), 9, y=40)

    header = Line("Preprint. Under review.", 8, y=PAGE_H - 40)
    page1 = [header,
             Line("Sparse Adapters for Fast Domain Transfer", 17, bold=True, y=PAGE_H - 90),
             Line("Ada Lovelace and Alan Turing", 11, gap_before=6),
             Line("Analytical Engines Lab", 10),
             Line("Abstract", 12, bold=True, gap_before=14),
             Line("We present sparse adapters, a method that transfers language models to new domains"),
             Line("with one percent of the parameters. On three benchmarks they match full fine-tuning."),
             head("1 Introduction"),
             Line("Fine-tuning every weight of a large model is costly. Adapters cut this cost, but dense"),
             Line("adapters still update millions of parameters. We ask whether sparse represen-"),
             Line("tations can do the same work with far fewer updates."),
             Line("Our contributions are a sparse adapter and a study of its transfer."),
             head("2 Method"),
             Line("A sparse adapter keeps a fixed mask over the weight matrix and learns only the"),
             Line("masked entries. The mask is chosen once from gradient magnitudes on a small batch."),
             Line("2.1 Mask selection", 11, bold=True, gap_before=6),
             Line("We keep the top one percent of entries by the magnitude of their gradient."),
             foot(1)]
    page2 = [header,
             head("3 Results"),
             Line("On the legal, medical and code benchmarks sparse adapters reach 98.7 percent of the"),
             Line("accuracy of full fine-tuning while training 1.2 percent of the weights."),
             head("4 Conclusion"),
             Line("Sparse adapters transfer models cheaply. Future work will learn the mask itself."),
             head("References"),
             Line("[1] N. Houlsby et al. Parameter-efficient transfer learning for NLP. ICML, 2019."),
             Line("[2] E. Hu et al. LoRA: Low-rank adaptation of large language models. ICLR, 2022."),
             foot(2)]
    return [page1, page2]
