"The package as users get it: the wheel, the console script, the README, the notebook/module pairing."
import subprocess, sys, zipfile, tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT/'bigmodel_nb'


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out), str(ROOT)],
                   check=True, capture_output=True)
    (whl,) = out.glob('bigmodel_nb-*.whl')
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_exported_module(wheel):
    exported = {f'bigmodel_nb/{p.name}' for p in PKG.glob('*.py')}
    assert {'bigmodel_nb/__init__.py', 'bigmodel_nb/_modidx.py', 'bigmodel_nb/cli.py'} <= exported
    missing = exported - set(wheel.namelist())
    assert not missing, f'modules missing from the wheel: {sorted(missing)}'


def test_wheel_declares_console_script(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith('.dist-info/entry_points.txt')]
    text = wheel.read(ep).decode()
    assert '[console_scripts]' in text and 'bigmodel-nb = bigmodel_nb.cli:main' in text


def test_wheel_metadata_has_extras_and_no_exact_pins(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith('.dist-info/METADATA')]
    reqs = [l for l in wheel.read(meta).decode().splitlines() if l.startswith('Requires-Dist:')]
    for extra in ('serve', 'dev', 'docs'): assert any(f'extra == "{extra}"' in r for r in reqs), extra
    assert not [r for r in reqs if '==' in r.split(';')[0]], f'exact pins: {reqs}'


def test_console_script_help():
    res = subprocess.run(['bigmodel-nb', '--help'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'lifecycle' in res.stdout


def test_every_chapter_has_a_module():
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['nbdev']
    assert cfg['lib_path'] == 'bigmodel_nb' and cfg['nbs_path'] == 'nbs'
    assert set(cfg['tst_flags'].split()) == {'notest', 'slow'}
    for nb in sorted((ROOT/'nbs').glob('[0-9][0-9]_*.ipynb')):
        src = nb.read_text()
        assert '#| default_exp ' in src, f'{nb.name} names no module (#| default_exp)'
        mod = src.split('#| default_exp ', 1)[1].split('\\n', 1)[0].split('"', 1)[0].strip()
        assert (PKG/f'{mod}.py').exists(), f'{nb.name} exports {mod}, but bigmodel_nb/{mod}.py is missing'


def test_no_settings_ini():
    assert not (ROOT/'settings.ini').exists(), 'nbdev 3 reads pyproject.toml; settings.ini must not exist'


def test_readme_is_generated_from_index():
    res = subprocess.run([sys.executable, str(ROOT/'scripts'/'readme.py'), '--check'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
