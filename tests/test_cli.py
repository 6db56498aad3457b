"The `bigmodel-nb` command as a user runs it: the console script in a subprocess (and `main` in-process for the error cases)."
import json, shutil, subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bigmodel_nb.cli import main


def run(*args, timeout=900):
    return subprocess.run(['bigmodel-nb', *args], capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *argv):
    "Exit status, stdout and stderr of `main(argv)` (argparse's own errors exit through SystemExit)."
    try: rc = main(list(map(str, argv)))
    except SystemExit as e: rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    "One quick lifecycle with two epochs (`--quick --epochs 2` once failed with a TypeError after making an empty run folder)."
    out = tmp_path_factory.mktemp('runs')
    res = run('lifecycle', '--quick', '--epochs', '2', '--out', str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return res, run_dir


@pytest.fixture(scope='module')
def images(quick_run, tmp_path_factory):
    "Eight test images as uint8 pixels (the package's own preprocessing undone), a PNG of the first and a .npy of all."
    from bigmodel_nb.data import image_dataloaders
    from bigmodel_nb.cnn import load_cnn
    _, run_dir = quick_run
    dls = image_dataloaders('fashion_mnist', batch_size=128, valid_pct=0.0, limit=3000, verbose=False)  # the run's data
    x = dls.test.x[:8]
    px = ((x * dls.std[:, None, None] + dls.mean[:, None, None]) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    d = tmp_path_factory.mktemp('images')
    Image.fromarray(px[0, 0]).save(d/'first.png'); np.save(d/'eight.npy', px)
    with torch.no_grad(): ref = load_cnn(run_dir/'model.safetensors')(x).argmax(-1).tolist()
    return d, ref, dls.classes


def test_quick_lifecycle_prints_progress_and_accuracy(quick_run):
    res, _ = quick_run
    for step in ('[1/', 'data done', 'train done', 'evaluate done', 'report done'): assert step in res.stdout, step
    assert 'test accuracy' in res.stdout


def test_quick_lifecycle_writes_a_measured_report(quick_run):
    _, run_dir = quick_run
    for f in ('report.md', 'metrics.json', 'confusion.png', 'model.safetensors'): assert (run_dir/f).is_file(), f
    m = json.loads((run_dir/'metrics.json').read_text())
    assert m['results']['train']['epochs'] == 2, m['results']['train']
    acc = m['results']['evaluate']['test_acc']
    assert 0.7 < acc <= 1, f'a quick run (2 epochs, 3,000 images) should pass 70% test accuracy; got {acc}'
    report = (run_dir/'report.md').read_text()
    assert f"test_acc={acc:.4g}" in report and m['machine'] in report
    assert 'goals not evaluated (quick run)' in report and 'int8_goal' not in report and 'pruning_goal' not in report
    assert set(load_file(run_dir/'model.safetensors')), 'no tensors in the saved weights'


def test_quick_lifecycle_ships_a_checked_package_with_int8(quick_run):
    _, run_dir = quick_run
    m = json.loads((run_dir/'metrics.json').read_text())['results']
    assert (run_dir/'training.png').is_file() and '![curves](training.png)' in (run_dir/'report.md').read_text()
    pkg = m['package']
    assert pkg['files'] == len(list((run_dir/'package').iterdir())) - 1 and (run_dir/'package'/'model.int8.onnx').is_file()
    assert pkg['predictor_agreement'] == 1.0, 'the fp32 package must predict exactly what torch predicts'
    assert pkg['predictor_acc'] == pytest.approx(m['evaluate']['test_acc'])
    assert pkg['int8_agreement'] >= 0.95 and abs(pkg['int8_predictor_acc'] - pkg['predictor_acc']) <= 0.02


def test_quick_lifecycle_distills_calibrates_serves_and_attacks(quick_run):
    _, run_dir = quick_run
    m = json.loads((run_dir/'metrics.json').read_text())['results']
    assert list(m) == ['data', 'train', 'evaluate', 'distill', 'calibrate', 'compress', 'export', 'package', 'serve', 'attack']
    d, c, s, a = m['distill'], m['calibrate'], m['serve'], m['attack']
    assert d['param_ratio'] <= 0.1 and d['student_acc'] > 0.5 and (run_dir/'student_package'/'manifest.json').is_file(), d
    assert c['ece_after'] < c['ece_before'] and m['package']['temperature'] == pytest.approx(c['temperature']), (c, m['package'])
    assert s['labels_match'] and s['errors'] == 0 and s['images'] == 500 and (run_dir/'serving.md').is_file(), s
    assert a['attack_images'] == 200 and a['pgd_acc'] <= a['fgsm_acc'] <= a['clean_acc'], a
    report = (run_dir/'report.md').read_text()
    assert '![reliability](reliability.png)' in report and '## Serving' in report


def test_verify_prints_a_readable_summary_or_json(quick_run, capsys):
    _, run_dir = quick_run
    res = run('verify', str(run_dir/'package'), timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'verified, every file matches its SHA-256' in res.stdout and 'labels (10): T-shirt/top, Trouser' in res.stdout
    assert '| model.int8.onnx |' in res.stdout and 'image_classifier' in res.stdout
    rc, out, err = run_main(capsys, 'verify', run_dir/'package', '--json')
    s = json.loads(out)
    manifest = json.loads((run_dir/'package'/'manifest.json').read_text())
    assert s['verified'] is True and s['files'] == manifest['files'] and s['int8'] is True and len(s['labels']) == 10


def test_predict_png_and_npy_as_a_table_and_as_json(quick_run, images, capsys):
    _, run_dir = quick_run
    d, ref, classes = images
    res = run('predict', str(run_dir/'package'), str(d/'first.png'), str(d/'eight.npy'), timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith('| ') and not l.startswith('| file')]
    assert len(lines) == 9, res.stdout  # one PNG, then the eight images of the .npy
    assert lines[0].startswith(f"| {d/'first.png'} | {classes[ref[0]]} |")
    assert lines[1].startswith(f"| {d/'eight.npy'}[0] | {classes[ref[0]]} |") and lines[1].endswith('% |')
    rc, out, err = run_main(capsys, 'predict', run_dir/'package', d/'eight.npy', '--json')
    rows = json.loads(out)
    assert [r['label_id'] for r in rows] == ref, 'the package must predict what the trained torch model predicts'
    assert [r['label'] for r in rows] == [classes[i] for i in ref]
    assert all(0.1 <= r['probability'] <= 1 for r in rows)


def test_library_errors_exit_2_with_a_message_and_no_traceback(quick_run, images, tmp_path):
    _, run_dir = quick_run
    d, _, _ = images
    bad = tmp_path/'tampered'; shutil.copytree(run_dir/'package', bad)
    b = bytearray((bad/'model.onnx').read_bytes()); b[len(b) // 2] ^= 1; (bad/'model.onnx').write_bytes(bytes(b))
    res = run('predict', str(bad), str(d/'first.png'), timeout=300)
    assert res.returncode == 2 and res.stdout == '' and 'Traceback' not in res.stderr
    assert 'model.onnx fails its checksum' in res.stderr and '--debug shows the traceback' in res.stderr


def test_error_cases_in_process(quick_run, images, tmp_path, capsys):
    _, run_dir = quick_run
    d, _, _ = images
    pkg = run_dir/'package'
    rc, out, err = run_main(capsys, 'verify', tmp_path/'nowhere')
    assert rc == 2 and 'no package folder there' in err and 'Traceback' not in err, err
    rc, out, err = run_main(capsys, 'verify', tmp_path/'nowhere', '--debug')
    assert rc == 2 and 'Traceback' in err and 'PackageError' in err
    (tmp_path/'notes.txt').write_text('not an image')
    for files, msg in [([d/'missing.png'], 'missing.png: no such file'),
                       ([tmp_path/'notes.txt'], 'not an image Pillow can read'),
                       ([d/'first.png', d/'missing.npy'], 'missing.npy: no such file')]:
        rc, out, err = run_main(capsys, 'predict', pkg, *files)
        assert rc == 2 and msg in err and 'Traceback' not in err, (files, err)
    np.save(tmp_path/'wrong.npy', np.zeros((2, 32, 32), np.uint8))
    rc, out, err = run_main(capsys, 'predict', pkg, tmp_path/'wrong.npy')
    assert rc == 2 and 'wrong shape (2, 1, 32, 32)' in err and '(N, 1, 28, 28)' in err, err


def test_a_token_package_is_not_an_image_package(tmp_path, capsys):
    from bigmodel_nb.concepts import TransformerConfig, TransformerLM
    from bigmodel_nb.deploy import CharTokenizer, save_package, token_config
    torch.manual_seed(0)
    text = 'To be, or not to be, that is the question'
    tok = CharTokenizer(text)
    lm = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=16, d_model=16, n_layers=1, n_heads=2)).eval()
    ids = torch.stack([tok.encode(text[i:i + 8]) for i in (0, 8)])
    folder = save_package(lm, tmp_path/'lm', ids, token_config(tok, max_sequence=16, name='tiny-lm'))
    rc, out, err = run_main(capsys, 'verify', folder)
    assert rc == 0 and 'tiny-lm (token_model' in out and 'tokens int64 (batch, sequence)' in out, out + err
    np.save(tmp_path/'ids.npy', ids.numpy())
    rc, out, err = run_main(capsys, 'predict', folder, tmp_path/'ids.npy')
    assert rc == 2 and "a 'token_model' package, not an image package" in err, err


def test_bad_arguments_get_a_clear_error(tmp_path, capsys):
    rc, out, err = run_main(capsys, 'lifecycle', '--epochs', 'two')
    assert rc == 2 and "invalid int value: 'two'" in err
    rc, out, err = run_main(capsys, 'nonsense')
    assert rc == 2 and 'invalid choice' in err
    for argv, msg in [(['--epochs', '0'], 'epochs must be at least 1, got 0'), (['--data', tmp_path/'nowhere'], 'no such folder')]:
        rc, out, err = run_main(capsys, 'lifecycle', '--quick', '--out', tmp_path/'runs', *argv)
        assert rc == 2 and msg in err and 'Traceback' not in err, err
        assert not (tmp_path/'runs').exists() or not any((tmp_path/'runs').iterdir()), 'a refused run leaves no run folder'


def test_info_names_the_data_sources(capsys):
    rc, out, err = run_main(capsys, 'info')
    assert rc == 0, err
    assert 'fashion_mnist:' in out and 'digits:' in out


def test_train_runs_on_one_process_and_on_two_through_torchrun(tmp_path):
    "`bigmodel-nb train --nproc 2` re-launches itself through torchrun (`python -m bigmodel_nb.cli train ...`)."
    logs = {}
    for n in (1, 2):
        res = run('train', '--nproc', str(n), '--data', 'digits', '--epochs', '1', '--limit', '600', '--out', str(tmp_path/f'p{n}'), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        logs[n] = json.loads((tmp_path/f'p{n}'/'log.json').read_text())
        assert logs[n]['world_size'] == n and (tmp_path/f'p{n}'/'model.safetensors').is_file()
    assert f"{2} process(es): valid accuracy" in res.stdout
    assert len(logs[1]['log']) == len(logs[2]['log']) == 1


def test_lm_quick_trains_samples_and_packages(tmp_path):
    res = run('lm', '--quick', '--arch', 'gru', '--out', str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    m = json.loads((run_dir/'metrics.json').read_text())
    assert m['arch'] == 'gru' and m['quick'] is True and 1.0 < m['valid_nats'] < 4.4, m  # uniform over 77 characters: 4.34 nats
    assert (run_dir/'curve.png').is_file() and 'temperature 0.5' in (run_dir/'samples.txt').read_text()
    res = run('verify', str(run_dir/'package'), timeout=300)
    assert res.returncode == 0 and 'token_model' in res.stdout, res.stdout + res.stderr


def test_serve_answers_health_and_stops_cleanly_on_sigterm(quick_run):
    "The console script binds 127.0.0.1 by default and exits 0 on SIGTERM."
    import signal, socket, time, urllib.request
    _, run_dir = quick_run
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    p = subprocess.Popen(['bigmodel-nb', 'serve', str(run_dir/'package'), '--port', str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/v2/health/ready', timeout=2) as r:
                    if r.status == 200: break
            except OSError: time.sleep(0.2)
        else: raise AssertionError('the server never became ready')
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/v2', timeout=5) as r: meta = json.loads(r.read())
        assert 'name' in meta and 'version' in meta, meta  # the protocol's server metadata
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]


def test_keygen_sign_verify_and_a_forged_package_is_refused(quick_run, tmp_path, capsys):
    _, run_dir = quick_run
    pkg = tmp_path/'pkg'; shutil.copytree(run_dir/'package', pkg)
    rc, out, err = run_main(capsys, 'keygen', tmp_path/'key')
    assert rc == 0 and (tmp_path/'key.pub').is_file() and oct((tmp_path/'key').stat().st_mode)[-3:] == '600', err
    rc, out, err = run_main(capsys, 'verify', pkg, '--trusted', tmp_path/'key.pub')
    assert rc == 2 and 'unsigned package' in err, err
    rc, out, err = run_main(capsys, 'sign', pkg, '--key', tmp_path/'key')
    assert rc == 0 and 'signed' in out, err
    rc, out, err = run_main(capsys, 'verify', pkg, '--trusted', tmp_path/'key.pub')
    assert rc == 0 and 'signature: valid, by a trusted key' in out, err
    # a forgery: new labels and a manifest rewritten to match pass the checksums, not the signature
    import hashlib
    cfg = json.loads((pkg/'config.json').read_text()); cfg['labels'] = list(reversed(cfg['labels']))
    b = json.dumps(cfg).encode(); (pkg/'config.json').write_bytes(b)
    man = json.loads((pkg/'manifest.json').read_text())
    man['files']['config.json'] = {'sha256': hashlib.sha256(b).hexdigest(), 'bytes': len(b)}
    (pkg/'manifest.json').write_text(json.dumps(man))
    assert run_main(capsys, 'verify', pkg)[0] == 0  # checksums alone accept it
    rc, out, err = run_main(capsys, 'verify', pkg, '--trusted', tmp_path/'key.pub')
    assert rc == 2 and 'signature' in err, err


def test_explain_prints_the_top_k_and_writes_grad_cam(quick_run, images, tmp_path, capsys):
    _, run_dir = quick_run
    d, ref, classes = images
    rc, out, err = run_main(capsys, 'explain', run_dir/'package', d/'first.png', '--k', '2', '--out', tmp_path/'cam.png')
    assert rc == 0, err
    assert classes[ref[0]] in out and (tmp_path/'cam.png').read_bytes()[:4] == b'\x89PNG'
