"""The notebooks used as a person uses them: JupyterLab in a real browser, "Run All Cells", no errors.

Starts `jupyter lab` on a free loopback port with a random token, fresh config/runtime/settings/workspace
dirs and a temporary copy of one chapter (the committed notebook is never rewritten), opens it in Debian's
Chromium driven by Playwright, checks JupyterLab did not ask for a kernel (the notebooks carry a
`python3` kernelspec), clears the outputs and runs every cell from the menus, waits until the toolbar's
execution indicator reports every scheduled cell done and the kernel idle, saves the notebook from the File
menu, and reads the saved copy: every code cell has an execution count (1, 2, ... in order), no error output.
"""
import importlib.util, json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parent.parent/'nbs'
CHAPTER = '00_concepts.ipynb'  # the fastest chapter (~20 s under `jupyter execute`) that still uses the library
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-quic']
SERVER_START_S, OPEN_S, RUN_S = 60, 60, 100  # seconds allowed for each step


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _settings(path: Path, values: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a temporary copy of the chapter: yields (url of the notebook, dir of the copy, server log)."
    if not shutil.which('chromium'): pytest.skip('Debian chromium not installed (scripts/install.sh installs it as root)')
    try: import playwright.sync_api  # noqa: F401  (only whether it is there)
    except ImportError: pytest.skip('playwright not installed (the dev extra: pip install -e ".[dev]")')
    if importlib.util.find_spec('jupyterlab') is None: pytest.skip('jupyterlab not installed (the dev extra)')
    work = tmp_path/'nbs'
    work.mkdir()
    shutil.copy(NBS/CHAPTER, work/CHAPTER)
    env = dict(os.environ)
    for var in ['JUPYTER_CONFIG_DIR', 'JUPYTER_RUNTIME_DIR', 'JUPYTER_DATA_DIR', 'JUPYTERLAB_SETTINGS_DIR',
                'JUPYTERLAB_WORKSPACES_DIR', 'IPYTHONDIR']:
        env[var] = str(tmp_path/'home'/var.lower())
        os.makedirs(env[var])
    env.pop('JUPYTER_PATH', None); env.pop('JUPYTER_PLATFORM_DIRS', None)
    settings = Path(env['JUPYTERLAB_SETTINGS_DIR'])
    # no "official Jupyter news?" toast and no update check (nothing to reach offline)
    _settings(settings/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings',
              {'fetchNews': 'false', 'checkForUpdates': False})
    # render only the cells in view (JupyterLab's "full" windowing): with the default, a long chapter takes JupyterLab
    # most of a minute to lay out on two busy cores; the test reads the run's results from the saved notebook instead
    _settings(settings/'@jupyterlab'/'notebook-extension'/'tracker.jupyterlab-settings', {'windowingMode': 'full'})
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}', '--ServerApp.port_retries=0',
           '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')
    log_path = tmp_path/'jupyterlab.log'
    with open(log_path, 'w') as log:
        server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f'jupyter lab exited ({server.returncode}) before it served:\n{log_path.read_text()[-3000:]}')
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.monotonic() > deadline:
                pytest.fail(f'jupyter lab did not answer within {SERVER_START_S}s:\n{log_path.read_text()[-3000:]}')
            time.sleep(0.3)
        yield f'http://127.0.0.1:{port}/lab/tree/{CHAPTER}?token={token}', work, log_path
    finally:  # the server and its kernels (same process group)
        try: os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL); server.wait(5)


# opened: a code cell in view, a kernel named in the toolbar, idle in the status bar -- or a dialog (which the test refuses)
_READY = """() => { if (document.querySelector('.jp-Dialog')) return true;
                    const name = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName');
                    const k = document.querySelector('.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator');
                    return !!document.querySelector('.jp-Notebook .jp-CodeCell') && !!name && !!k
                           && !/^\\s*(No Kernel)?\\s*$/.test(name.textContent) && k.dataset.status === 'idle'
                           && /\\| Idle/.test(document.querySelector('.jp-StatusBar-Widget')?.textContent || ''); }"""
# cleared: no prompt in view holds a count, no output in view
_CLEARED = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].every(e => /^\\[ ?\\]:$/.test(e.textContent.trim()))
                 && !document.querySelector('.jp-Notebook .jp-OutputArea-output')"""
# finished: the toolbar's execution indicator leaves "busy" (cells still scheduled: "Executed 3/51 cells") for idle with
# "Executed 51 cells"; it follows the cells Run All scheduled, not the kernel's brief idles between them
_FINISHED = """() => { const k = document.querySelector('.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator');
                       return !!k && k.dataset.status === 'idle' && /Executed \\d+ cells?/.test(k.textContent)
                              && !/Executed \\d+\\/\\d+/.test(k.textContent); }"""
_INDICATOR = "() => document.querySelector('.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator')?.textContent"


def _menu(page, menu, item):
    "Click `menu` in JupyterLab's menu bar, then `item` in it."
    page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(f'^{re.escape(menu)}$')).click()
    page.locator('.lm-Menu-itemLabel', has_text=re.compile(f'^{item}$')).click()


def test_run_all_cells_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright, Error as PlaywrightError
    url, work, log_path = lab
    nb_path = work/CHAPTER
    code_cells = sum(c['cell_type'] == 'code' for c in json.loads(nb_path.read_text())['cells'])
    shots = tmp_path/'screenshots'
    shots.mkdir()
    where = f'(screenshots in {shots}, server log {log_path})'
    with sync_playwright() as p:  # Playwright gives Chromium a fresh temporary profile (--user-data-dir)
        browser = p.chromium.launch(executable_path=shutil.which('chromium'), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 900})
            t0 = time.monotonic()
            page.goto(url, timeout=OPEN_S*1000)
            # the kernel starts by itself (no dialog asks for one): the toolbar names it, the status bar says Idle
            try: page.wait_for_function(_READY, timeout=OPEN_S*1000, polling=250)
            except PlaywrightError:
                page.screenshot(path=shots/'open.png')
                raise AssertionError(f'{CHAPTER} did not open with an idle kernel within {OPEN_S}s '
                                     f'(kernel: {page.locator(".jp-NotebookPanel-toolbar .jp-KernelName").all_inner_texts()}) {where}')
            opened = time.monotonic() - t0
            page.screenshot(path=shots/'open.png')
            dialogs = page.locator('.jp-Dialog')
            assert dialogs.count() == 0, \
                f'JupyterLab opened a dialog on open (kernel selection?): {dialogs.first.inner_text()!r} {where}'

            # Edit > Clear Outputs of All Cells (so the saved run's counts and outputs cannot pass for this one's),
            # then Run > Run All Cells, as a person does
            _menu(page, 'Edit', 'Clear Outputs of All Cells')
            page.wait_for_function(_CLEARED, timeout=10_000)
            t0 = time.monotonic()
            _menu(page, 'Run', 'Run All Cells')
            try: page.wait_for_function(_FINISHED, timeout=RUN_S*1000, polling=500)
            except PlaywrightError:
                page.screenshot(path=shots/'timeout.png')
                raise AssertionError(f'"Run All Cells" did not finish within {RUN_S}s: {page.evaluate(_INDICATOR)!r} {where}')
            ran = time.monotonic() - t0
            page.screenshot(path=shots/'ran.png')

            # File > Save Notebook: the run's counts and outputs, as nbformat holds them, land in the temporary copy
            before = nb_path.stat().st_mtime_ns
            _menu(page, 'File', 'Save Notebook')
            try: page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')", timeout=20_000)
            except PlaywrightError: raise AssertionError(f'the notebook was not saved within 20s {where}')
            assert nb_path.stat().st_mtime_ns != before, f'Save Notebook did not write {nb_path} {where}'
        finally:
            browser.close()
    cells = [c for c in json.loads(nb_path.read_text())['cells'] if c['cell_type'] == 'code']
    assert len(cells) == code_cells
    errors = [(i, o) for i, c in enumerate(cells) for o in c['outputs'] if o['output_type'] == 'error']
    if errors:
        i, o = errors[0]
        tb = re.sub(r'\x1b\[[0-9;]*m', '', '\n'.join(o['traceback']))
        raise AssertionError(f'{len(errors)} error output(s) after Run All Cells; code cell {i}:\n'
                             f'{"".join(cells[i]["source"])[:500]}\n{tb[-3000:]}\n{where}')
    counts = [c['execution_count'] for c in cells]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, f'code cells {missing} did not run {where}'
    assert counts == list(range(1, code_cells + 1)), f'cells ran out of order or twice: {counts}'
    stderr = sum(o['output_type'] == 'stream' and o['name'] == 'stderr' for c in cells for o in c['outputs'])
    print(f'{CHAPTER}: opened with an idle kernel in {opened:.1f}s; Run All Cells ran {code_cells} code cells in {ran:.1f}s; '
          f'stderr outputs: {stderr}')
