"The built docs site (docs/_build/html, made by `make docs`, which `make test` runs before pytest)."
import re, shutil, subprocess, tempfile
from pathlib import Path

import pytest

HTML = Path(__file__).resolve().parent.parent/'docs'/'_build'/'html'
pytestmark = pytest.mark.skipif(not (HTML/'index.html').exists(), reason='docs not built: run `make docs` first')
# what a page *loads* (scripts, stylesheets, images, frames, fonts) — plain <a href> links to other sites are fine
_load = re.compile(r'<(?:script|img|iframe|source|link)\b[^>]*?\b(?:src|href)="(?:https?:)?//[^"]+"[^>]*>', re.I)


def pages(): return sorted(HTML.glob('*.html'))


def test_a_page_per_notebook_in_chapter_order():
    nbs = sorted(p.stem for p in (HTML.parent.parent.parent/'nbs').glob('[0-9][0-9]_*.ipynb'))
    assert nbs, 'no chapter notebooks found'
    for nb in nbs: assert (HTML/f'{nb}.html').exists(), f'no page for {nb}'
    nav = (HTML/'index.html').read_text()
    positions = [nav.find(f'href="{nb}.html"') for nb in nbs]
    assert -1 not in positions and positions == sorted(positions), f'chapters missing or out of order in the sidebar: {nbs}'


def test_pages_load_nothing_external():
    for page in pages():
        html = page.read_text()
        bad = [m.group(0)[:160] for m in _load.finditer(html) if 'rel="canonical"' not in m.group(0)]
        assert not bad, f'{page.name} loads external resources: {bad}'
    for css in HTML.glob('_static/**/*.css'):
        assert not re.search(r'url\(["\']?https?://', css.read_text(errors='ignore')), f'{css} loads an external url()'


def test_mathjax_is_bundled_and_search_exists():
    assert (HTML/'_static'/'mathjax'/'tex-chtml.js').exists()
    assert (HTML/'search.html').exists() and (HTML/'searchindex.js').exists()


def test_concepts_page_has_math_plot_and_api_reference():
    html = (HTML/'00_concepts.html').read_text()
    assert 'class="math' in html, 'no math on the concepts page'
    assert re.search(r'<img[^>]+src="_images/', html), 'no plot on the concepts page'
    assert 'set_seed' in html and 'default_device' in html, 'no API reference (show_doc) on the concepts page'


@pytest.mark.skipif(not shutil.which('chromium'), reason='Debian chromium not installed (scripts/install.sh installs it as root)')
def test_headless_chromium_renders_math_offline():
    "Chromium with every host unresolvable (network off) renders the concepts page, MathJax included."
    with tempfile.TemporaryDirectory() as prof:
        res = subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                              '--disable-background-networking', '--disable-component-update', '--disable-sync',
                              '--host-resolver-rules=MAP * ~NOTFOUND', f'--user-data-dir={prof}',
                              '--virtual-time-budget=8000', '--dump-dom', (HTML/'00_concepts.html').as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert '<mjx-container' in res.stdout, 'MathJax did not typeset the page offline'


CJK = '大模型'  # the seed's word for "large model", quoted on the concepts page


def _playwright():
    if not shutil.which('chromium'): pytest.skip('Debian chromium not installed (scripts/install.sh installs it as root)')
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.skip('playwright not installed (the dev extra: pip install -e ".[dev]")')
    return sync_playwright


def _ink(png: bytes):
    "Dark pixels of a screenshot, cropped to their bounding box: (count, width, height, bitmap)."
    import io
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('L')
    w, h = im.size
    dark = [[im.getpixel((x, y)) < 128 for x in range(w)] for y in range(h)]
    ys = [y for y in range(h) if any(dark[y])]
    xs = [x for x in range(w) if any(dark[y][x] for y in range(h))]
    if not xs: return 0, 0, 0, ()
    rows = tuple(tuple(r[xs[0]:xs[-1]+1]) for r in dark[ys[0]:ys[-1]+1])
    return sum(map(sum, rows)), xs[-1]-xs[0]+1, ys[-1]-ys[0]+1, rows


def test_chinese_quotations_render_with_real_glyphs(tmp_path):
    """The concepts page's Chinese word renders as glyphs, not tofu boxes (fonts-noto-cjk, installed by scripts/install.sh).

    Without a CJK font Chromium draws every missing character as the same narrow empty box: each character
    takes ~0.6em and all hold about the same ink. With one, each is a full-width (1em) glyph, and 模 (14 strokes)
    holds far more ink than 大 (3)."""
    sync_playwright = _playwright()
    page_html = HTML/'00_concepts.html'
    assert CJK in page_html.read_text(), f'{CJK} no longer on the concepts page: point this test at a page that quotes Chinese'
    args = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
            '--disable-sync', '--no-first-run', '--disable-quic', '--host-resolver-rules=MAP * ~NOTFOUND']
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which('chromium'), args=args)
        try:
            page = browser.new_page(device_scale_factor=2)  # twice the pixels: strokes stay apart in the bitmaps
            page.goto(page_html.as_uri(), wait_until='load', timeout=30_000)
            page.locator('li', has_text=CJK).first.screenshot(path=tmp_path/'cjk-item.png')  # to look at by hand
            # each character in a span of its own, in place, so it keeps the page's font and size
            font_px = page.evaluate('''cjk => {
                const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
                for (let n; (n = walk.nextNode());) {
                  const i = n.data.indexOf(cjk); if (i < 0) continue;
                  const word = n.splitText(i); word.splitText(cjk.length);
                  const box = document.createElement('span'); box.id = 'cjk-test'; word.replaceWith(box);
                  for (const ch of cjk) { const s = document.createElement('span'); s.textContent = ch; box.appendChild(s); }
                  return parseFloat(getComputedStyle(box).fontSize);
                }
                return null; }''', CJK)
            assert font_px, f'{CJK} not found in the rendered page'
            chars = page.locator('#cjk-test > span')
            widths = [chars.nth(i).bounding_box()['width'] for i in range(len(CJK))]
            inks = []
            for i, ch in enumerate(CJK):
                png = chars.nth(i).screenshot(path=tmp_path/f'cjk-{i}.png')
                inks.append(_ink(png))
        finally:
            browser.close()
    where = f'(screenshots in {tmp_path})'
    assert all(w >= 0.9*font_px for w in widths), \
        f'{CJK} is not full-width {widths} at {font_px}px: boxes, not glyphs; install a CJK font (fonts-noto-cjk, scripts/install.sh) {where}'
    assert all(n > 0 for n, *_ in inks), f'a character drew no ink {where}'
    counts = [n for n, *_ in inks]
    assert counts[1] > 1.3*counts[0], f'模 holds no more ink than 大 {counts}: not real glyphs {where}'
