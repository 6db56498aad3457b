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
