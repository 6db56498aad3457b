"The `bigmodel-nb` command as a user runs it: the console script, in a subprocess."
import json, subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file


def run(*args, timeout=900):
    return subprocess.run(['bigmodel-nb', *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    res = run('lifecycle', '--quick', '--out', str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return res, run_dir


def test_quick_lifecycle_prints_progress_and_accuracy(quick_run):
    res, _ = quick_run
    for step in ('[1/', 'data done', 'train done', 'evaluate done', 'report done'): assert step in res.stdout, step
    assert 'test accuracy' in res.stdout


def test_quick_lifecycle_writes_a_measured_report(quick_run):
    _, run_dir = quick_run
    for f in ('report.md', 'metrics.json', 'confusion.png', 'model.safetensors'): assert (run_dir/f).is_file(), f
    m = json.loads((run_dir/'metrics.json').read_text())
    acc = m['results']['evaluate']['test_acc']
    assert 0.6 < acc <= 1, f'a quick run (1 epoch, 3,000 images) should pass 60% test accuracy; got {acc}'
    report = (run_dir/'report.md').read_text()
    assert f"test_acc={acc:.4g}" in report and m['machine'] in report
    assert set(load_file(run_dir/'model.safetensors')), 'no tensors in the saved weights'


def test_quick_lifecycle_ships_a_checked_package_with_int8(quick_run):
    _, run_dir = quick_run
    m = json.loads((run_dir/'metrics.json').read_text())['results']
    assert (run_dir/'training.png').is_file() and '![curves](training.png)' in (run_dir/'report.md').read_text()
    pkg = m['package']
    assert pkg['files'] == 5 and (run_dir/'package'/'model.int8.onnx').is_file()
    assert pkg['predictor_agreement'] == 1.0, 'the fp32 package must predict exactly what torch predicts'
    assert pkg['predictor_acc'] == pytest.approx(m['evaluate']['test_acc'])
    assert pkg['int8_agreement'] >= 0.95 and abs(pkg['int8_predictor_acc'] - pkg['predictor_acc']) <= 0.02


def test_info_names_the_data_sources():
    res = run('info', timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'fashion_mnist:' in res.stdout and 'digits:' in res.stdout


def test_bad_arguments_get_a_clear_error():
    res = run('lifecycle', '--epochs', 'two')
    assert res.returncode == 2 and "invalid int value: 'two'" in res.stderr
    res = run('nonsense')
    assert res.returncode == 2 and 'invalid choice' in res.stderr
