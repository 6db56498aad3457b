"Tests of `bigmodel_nb.serve`: the Open Inference Protocol against tritonclient, bad input (never a 5xx, fuzzed), batching, the repository, generation, metrics, Triton export, graceful shutdown, the lifecycle step."
import concurrent.futures, json, logging, os, shutil, signal, subprocess, sys, time

import httpx
import numpy as np
import orjson
import pytest
import torch

from bigmodel_nb.cnn import CNNConfig, FashionCNN
from bigmodel_nb.concepts import TransformerConfig, TransformerLM
from bigmodel_nb.data import CharTokenizer, channel_stats, load_fashion_mnist, normalize
from bigmodel_nb.deploy import image_config, load_package, save_package, token_config
from bigmodel_nb.serve import (ModelRepository, ServerThread, V2Client, check_triton_config, create_app, export_triton, histogram_from_metrics,
                               metric_samples, serve_process, step_serve)

torch.set_num_threads(1)
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows"


@pytest.fixture(scope='module')
def fashion():
    ds = load_fashion_mnist(verbose=False)
    mean, std = channel_stats(ds.x_train[:5000])
    return ds.x_test[:512].numpy(), ds.y_test[:512].numpy(), mean, std, list(ds.classes)


@pytest.fixture(scope='module')
def repo(tmp_path_factory, fashion):
    "A repository: an image classifier (version 1 good, version 2 tampered) and a small token model."
    x, _, mean, std, classes = fashion
    root = tmp_path_factory.mktemp('repo')
    torch.manual_seed(0)
    cnn = FashionCNN(CNNConfig(channels=(8, 16), convs=(1, 1))).eval()
    save_package(cnn, root/'fashion'/'1', normalize(torch.from_numpy(x[:2]), mean, std),
                 image_config(name='fashion', mean=mean, std=std, labels=classes, input_shape=(1, 28, 28)))
    shutil.copytree(root/'fashion'/'1', root/'fashion'/'2')
    b = bytearray((root/'fashion'/'2'/'model.onnx').read_bytes()); b[len(b) // 2] ^= 1
    (root/'fashion'/'2'/'model.onnx').write_bytes(bytes(b))
    tok = CharTokenizer(TEXT)
    lm = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=32, d_model=32, n_layers=2, n_heads=4)).eval()
    save_package(lm, root/'lm'/'1', torch.stack([tok.encode(TEXT[:8]), tok.encode(TEXT[8:16])]), token_config(tok, max_sequence=32, name='lm'))
    # with a key/value-cache decoder; untied, so its untrained greedy text varies; a context of 16, so long streams slide
    lm_kv = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=16, d_model=32, n_layers=2, n_heads=4, tied=False)).eval()
    save_package(lm_kv, root/'lm-kv'/'1', torch.stack([tok.encode(TEXT[:8]), tok.encode(TEXT[8:16])]), token_config(tok, max_sequence=16, name='lm-kv'),
                 decoder=True)
    return root


@pytest.fixture(scope='module')
def pred(repo): return load_package(repo/'fashion'/'1', threads=1, spin=False)


@pytest.fixture(scope='module')
def lm_pred(repo): return load_package(repo/'lm'/'1', threads=1, spin=False)


@pytest.fixture(scope='module')
def server(repo):
    with ServerThread(create_app(repo, max_body_bytes=1 << 20)) as url: yield url


def greedy(lm_pred, prompt, n):
    "One sequence alone through the full-window graph."
    out = prompt
    for _ in range(n): out += lm_pred(out[-lm_pred.max_sequence:]).names[0]
    return out[len(prompt):]


def test_tritonclient_unchanged(server, fashion, pred):
    "Triton's own client: health, metadata, and infer with binary and with JSON tensors."
    import tritonclient.http as triton
    x = fashion[0][:8]
    c = triton.InferenceServerClient(server.removeprefix('http://'))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready('fashion') and c.is_model_ready('fashion', '1')
    assert not c.is_model_ready('fashion', '2')  # tampered
    meta = c.get_model_metadata('fashion')
    assert meta['inputs'] == [{'name': 'pixels', 'datatype': 'UINT8', 'shape': [-1, 1, 28, 28]}] and meta['versions'] == ['1']
    assert c.get_server_metadata()['name'] == 'bigmodel_nb'
    for binary in (True, False):
        inp = triton.InferInput('pixels', [8, 1, 28, 28], 'UINT8'); inp.set_data_from_numpy(x, binary_data=binary)
        res = c.infer('fashion', [inp], outputs=[triton.InferRequestedOutput(o, binary_data=binary) for o in ('labels', 'probabilities')])
        np.testing.assert_array_equal(res.as_numpy('labels'), pred(x).labels)
        np.testing.assert_allclose(res.as_numpy('probabilities'), pred(x).probs, atol=1e-6)
    inp = triton.InferInput('pixels', [2, 28, 28], 'FP32'); inp.set_data_from_numpy((x[:2, 0] / 255).astype(np.float32))
    np.testing.assert_array_equal(c.infer('fashion', [inp]).as_numpy('labels'), pred(x[:2]).labels)
    c.close()


def test_openapi_served(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    assert '/v2/models/{name}/infer' in doc['paths'] and '/v2/repository/index' in doc['paths']
    body = doc['paths']['/v2/models/{name}/infer']['post']['requestBody']['content']['application/json']['schema']
    assert body['required'] == ['inputs']


GOOD = {'name': 'pixels', 'shape': [1, 28, 28], 'datatype': 'UINT8', 'data': [0] * 784}
BAD = [('/v2/models/fashion/infer', b'{"inputs": [', 400, 'not valid JSON'),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [{**GOOD, 'name': 'image'}]}), 400, "expected one input 'pixels'"),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [{**GOOD, 'shape': [1, 28, 27], 'data': [0] * 756}]}), 400, 'shape [1, 28, 27]'),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [{**GOOD, 'datatype': 'FP64'}]}), 400, 'datatype FP64'),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [{**GOOD, 'data': [0] * 783}]}), 400, '783 values'),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [{**GOOD, 'datatype': 'FP32', 'data': [1.5] * 784}]}), 400, 'in 0..1'),
       ('/v2/models/fashion/infer', b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', 400, 'not valid JSON'),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [GOOD], 'outputs': [{'name': 'x'}]}), 400, "unknown outputs ['x']"),
       ('/v2/models/fashion/infer', orjson.dumps({'inputs': [GOOD]}) + b' ' * (1 << 20), 413, 'limit'),
       ('/v2/models/nope/infer', orjson.dumps({'inputs': [GOOD]}), 404, "unknown model 'nope'"),
       ('/v2/models/fashion/versions/9/infer', orjson.dumps({'inputs': [GOOD]}), 404, "no version '9'"),
       ('/v2/models/fashion/versions/2/infer', orjson.dumps({'inputs': [GOOD]}), 400, 'checksum'),
       ('/v2/models/lm/generate', orjson.dumps({'text_input': 'To be ☃'}), 400, 'vocabulary'),
       ('/v2/models/lm/generate', orjson.dumps({'text_input': ''}), 400, 'text_input'),
       ('/v2/models/lm/generate', orjson.dumps({'text_input': 'To', 'parameters': {'max_tokens': 0}}), 400, 'max_tokens 0'),
       ('/v2/models/lm/generate_stream', orjson.dumps({'text_input': 'To', 'parameters': {'temperature': -1}}), 400, 'temperature -1'),
       ('/v2/models/lm/infer', orjson.dumps({'inputs': [{'name': 'tokens', 'shape': [1, 2], 'datatype': 'INT64', 'data': [0, 999]}]}), 400, 'out of the vocabulary'),
       ('/v2/models/fashion/generate', orjson.dumps({'text_input': 'hi'}), 400, 'generate needs a token model'),
       ('/v2/nothing', b'', 404, 'Not Found')]


@pytest.mark.parametrize('path,body,status,msg', BAD, ids=[f'{b[0]}-{b[3]}' for b in BAD])
def test_bad_input_is_a_json_error(server, path, body, status, msg):
    r = httpx.post(server + path, content=body)
    assert r.status_code == status and msg in r.json()['error'], (r.status_code, r.text[:300])


def test_binary_nan_and_bad_header(server):
    head = orjson.dumps({'inputs': [{'name': 'pixels', 'shape': [1, 28, 28], 'datatype': 'FP32', 'parameters': {'binary_data_size': 784 * 4}}]})
    r = httpx.post(f"{server}/v2/models/fashion/infer", content=head + np.full(784, np.nan, np.float32).tobytes(),
                   headers={'Inference-Header-Content-Length': str(len(head))})
    assert r.status_code == 400 and 'finite and in 0..1' in r.json()['error']
    r = httpx.post(f"{server}/v2/models/fashion/infer", content=head, headers={'Inference-Header-Content-Length': 'x'})
    assert r.status_code == 400 and 'Inference-Header-Content-Length' in r.json()['error']
    r = httpx.post(f"{server}/v2/models/fashion/infer", content=head + b'\0' * 10, headers={'Inference-Header-Content-Length': str(len(head))})
    assert r.status_code == 400 and 'does not fit' in r.json()['error']


def test_token_infer(server, lm_pred):
    ids = lm_pred.encode(TEXT[:10])
    with V2Client(server) as c: out = c.infer('lm', ids, input_name='tokens')
    np.testing.assert_array_equal(out['labels'], lm_pred(ids).labels)
    np.testing.assert_allclose(out['probabilities'], lm_pred(ids).probs, atol=1e-6)


def test_fuzz_no_server_error(server):
    """schemathesis generates valid and invalid requests from the served OpenAPI document; the models' names are put in
    most of them so that the requests reach real models. None gets a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis.errors import Unsatisfiable
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    failures, calls = [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        if '/load' in op.path or '/unload' in op.path: continue  # would change what the other tests see (tested on their own)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode), name=st.sampled_from(['fashion', 'lm', None]), version=st.sampled_from(['1', None]))
            def run(case, name, version):
                nonlocal calls
                if case.path_parameters and name is not None:
                    case.path_parameters = {**case.path_parameters, 'name': name, **({'version': version} if version and 'version' in case.path_parameters else {})}
                r = case.call(base_url=server, timeout=30); calls += 1
                if r.status_code >= 500: failures.append((case.method, case.formatted_path, r.status_code, r.text[:200]))
            try: run()
            except Unsatisfiable: pass  # e.g. no invalid request exists for an operation without parameters
    assert calls > 60 and not failures, failures[:5]


def test_batching_fuses_requests(repo, fashion, pred):
    x = fashion[0]
    with ServerThread(create_app(repo, max_batch_size=16, max_delay_ms=200.0)) as url:
        clients = [V2Client(url) for _ in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            out = list(ex.map(lambda i: clients[i].infer('fashion', x[i:i + 1], outputs=('labels',))['labels'][0], range(16)))
        text = clients[0].metrics()
    assert out == pred(x[:16]).labels.tolist()
    les, counts = histogram_from_metrics(text, 'bigmodel_batch_size', model='fashion')
    assert counts.sum() <= 4 and metric_samples(text, 'bigmodel_batch_size_sum', model='fashion')[0][1] == 16


def test_queue_full_503_with_retry_after(repo, fashion):
    x = fashion[0]
    with ServerThread(create_app(repo, max_queue=2, max_delay_ms=500.0)) as url:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(lambda i: httpx.post(f"{url}/v2/models/fashion/infer", timeout=30,
                                                  content=orjson.dumps({'inputs': [{**GOOD, 'data': x[i].ravel().tolist()}]})), range(4)))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503], codes
    full = [r for r in rs if r.status_code == 503][0]
    assert full.headers['retry-after'] == '1' and 'queue is full' in full.json()['error']


def test_repository_extension(repo, tmp_path):
    root = tmp_path/'r'; shutil.copytree(repo, root)
    with ServerThread(create_app(root)) as url, httpx.Client(base_url=url) as c:
        index = c.post('/v2/repository/index').json()
        assert [(i['name'], i['version'], i['state']) for i in index] == [('fashion', '1', 'READY'), ('fashion', '2', 'UNAVAILABLE'), ('lm', '1', 'READY'), ('lm-kv', '1', 'READY')]
        assert 'model.onnx fails its checksum' in index[1]['reason']
        assert c.post('/v2/repository/models/lm/unload').status_code == 200
        r = c.post('/v2/models/lm/generate', json={'text_input': 'To'}); assert r.status_code == 400 and 'no ready version' in r.json()['error']
        assert c.get('/v2/models/lm/ready').status_code == 400
        assert c.post('/v2/repository/models/lm/load').status_code == 200 and c.get('/v2/models/lm/ready').status_code == 200
        r = c.post('/v2/repository/models/fashion/load'); assert r.status_code == 400 and 'version 2' in r.json()['error']
        assert c.post('/v2/repository/models/nope/load').status_code == 404
        shutil.copytree(root/'fashion'/'1', root/'fashion'/'3')  # a new version appears on disk, then is loaded
        assert c.post('/v2/repository/models/fashion/load').status_code == 400  # version 2 still tampered
        assert c.get('/v2/models/fashion').json()['versions'] == ['1', '3']
        loaded = {l['version']: v for l, v in metric_samples(c.get('/metrics').text, 'bigmodel_model_loaded', model='fashion')}
        assert loaded == {'1': 1.0, '2': 0.0, '3': 1.0}


def test_model_process_serves_and_is_stopped_on_reload_and_shutdown(repo, fashion, pred):
    "process=True: the same labels as in-process; a reload stops the old model process, the server's shutdown the new one."
    x = fashion[0]
    app = create_app(repo/'fashion'/'1', process=True, max_batch_size=8)
    r = app.state.repo; old = r.models['fashion']['1'].worker
    assert old.process.is_alive()
    with ServerThread(app) as url:
        c = V2Client(url)
        assert c.infer('fashion', x[:20], outputs=('labels',))['labels'].tolist() == pred(x[:20]).labels.tolist()
        assert httpx.post(f"{url}/v2/repository/models/fashion/load", timeout=60).status_code == 200
        new = r.models['fashion']['1'].worker
        assert new is not old and new.process.is_alive()
        assert c.infer('fashion', x[20:30], outputs=('labels',))['labels'].tolist() == pred(x[20:30]).labels.tolist()
        old.process.join(10); assert not old.process.is_alive()
    assert not new.process.is_alive()


def test_model_process_death_makes_the_model_unavailable_until_reloaded(repo, fashion, pred):
    "A killed model process: the next request is a 503 that says so, readiness turns false, and a load brings it back."
    x = fashion[0]
    app = create_app(repo/'fashion'/'1', process=True)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        worker = app.state.repo.models['fashion']['1'].worker
        worker.process.kill(); worker.process.join()
        r = c.post('/v2/models/fashion/infer', content=orjson.dumps({'inputs': [{**GOOD, 'data': x[0].ravel().tolist()}]}))
        assert r.status_code == 503 and 'model process exited' in r.json()['error'], r.text
        assert c.get('/v2/models/fashion/ready').status_code == 400
        assert metric_samples(c.get('/metrics').text, 'bigmodel_model_loaded', model='fashion')[0][1] == 0.0
        assert c.post('/v2/repository/models/fashion/load').status_code == 200 and c.get('/v2/models/fashion/ready').status_code == 200
        assert V2Client(url).infer('fashion', x[:8], outputs=('labels',))['labels'].tolist() == pred(x[:8]).labels.tolist()


def test_token_model_process_death_ends_the_stream_and_makes_the_model_unavailable(repo):
    "A token model's process killed: the next stream ends with an error event that says so, the version turns UNAVAILABLE, a load brings it back."
    app = create_app(repo/'lm-kv'/'1', process=True)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        before = V2Client(url).generate('lm-kv', 'To be', 8)
        worker = app.state.repo.models['lm-kv']['1'].worker
        worker.process.kill(); worker.process.join()
        with pytest.raises(RuntimeError, match=r'the stream ended with an error: the model process exited \(status -9\)'):
            list(V2Client(url).stream('lm-kv', 'To be', 8))
        assert c.get('/v2/models/lm-kv/ready').status_code == 400
        assert metric_samples(c.get('/metrics').text, 'bigmodel_model_loaded', model='lm-kv')[0][1] == 0.0
        r = c.post('/v2/models/lm-kv/generate', json={'text_input': 'To be'}); assert r.status_code == 400 and 'model process exited' in r.json()['error']
        assert c.post('/v2/repository/models/lm-kv/load').status_code == 200
        new = app.state.repo.models['lm-kv']['1'].worker
        assert new is not worker and new.process.is_alive() and V2Client(url).generate('lm-kv', 'To be', 8) == before
    assert not new.process.is_alive()


def test_model_process_in_an_unguarded_script_is_a_clear_error(repo, tmp_path):
    "A script without a main guard: the spawned model process imports it again and dies; the error says what to add."
    script = tmp_path/'unguarded.py'
    script.write_text(f"from bigmodel_nb.serve import ModelProcess\nModelProcess({str(repo/'fashion'/'1')!r}, 10)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs `if __name__ == '__main__':`" in out.stderr, out.stderr[-2000:]


def test_single_package_folder(repo):
    r = ModelRepository(repo/'fashion'/'1'); r.load()
    assert [(i['name'], i['version'], i['state']) for i in r.index()] == [('fashion', '1', 'READY')]
    with pytest.raises(ValueError, match='no such folder'): ModelRepository(repo/'missing')


@pytest.mark.parametrize('model', ['lm', 'lm-kv'])
@pytest.mark.parametrize('process', [False, True])
def test_generation_continuous_batching(repo, model, process):
    "Concurrent streams of different lengths through the server (full window; key/value cache; in the server or in a model process) equal one-at-a-time full-window greedy generation."
    prompts, ns = ['To be', 'whether', 'the mind to', 'slings', 'or not to be, that'], [20, 3, 11, 7, 40]
    with ServerThread(create_app(repo, process=process)) as url:
        assert (repo.joinpath(model, '1', 'decoder.onnx').is_file()) == (model == 'lm-kv')
        def one(i):
            with V2Client(url) as c:
                return ''.join(c.stream(model, prompts[i], ns[i])) if i % 2 else c.generate(model, prompts[i], ns[i])
        with concurrent.futures.ThreadPoolExecutor(5) as ex: outs = list(ex.map(one, range(5)))
        text = httpx.get(f"{url}/metrics").text
    window = load_package(repo/model/'1', threads=1, spin=False); window.decoder = None
    assert outs == [greedy(window, p, n) for p, n in zip(prompts, ns)]
    if model == 'lm-kv': assert len(set(outs[0])) > 3  # the untied model's text varies: a real check
    les, counts = histogram_from_metrics(text, 'bigmodel_generation_batch_size', model=model)
    assert counts.sum() < sum(ns)  # steps were shared
    assert metric_samples(text, 'bigmodel_generated_tokens_total', model=model)[0][1] >= sum(ns)
    assert sum(histogram_from_metrics(text, 'bigmodel_time_to_first_token_seconds', model=model)[1]) >= 5


def test_stream_is_server_sent_events(server):
    with httpx.stream('POST', f"{server}/v2/models/lm/generate_stream", json={'text_input': 'To be', 'parameters': {'max_tokens': 5}}) as r:
        assert r.headers['content-type'].startswith('text/event-stream')
        events = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith('data: ')]
    assert len(events) == 5 and all(set(e) == {'model_name', 'model_version', 'text_output'} and len(e['text_output']) == 1 for e in events)


def test_sampling_seeded(server):
    with V2Client(server) as c:
        a, b, d = (c.generate('lm', 'To be', 30, temperature=5.0, seed=s) for s in (3, 3, 4))
    assert a == b and a != d


def test_metrics_drift_and_json_log(repo, fashion, pred, caplog):
    x = fashion[0]
    bright = np.clip(x.astype(np.int16) + 80, 0, 255).astype(np.uint8)
    with caplog.at_level(logging.INFO, logger='bigmodel_nb.serve'):
        drift = {}
        for name, imgs in [('plain', x), ('bright', bright)]:
            with ServerThread(create_app(repo)) as url, V2Client(url) as c:
                for i in range(0, 512, 32): c.infer('fashion', imgs[i:i + 32], outputs=('labels',))
                text = c.metrics()
            drift[name] = metric_samples(text, 'bigmodel_input_drift', model='fashion', version='1')[0][1]
            if name == 'plain': plain_text = text
    assert drift['plain'] < 0.1 < 0.4 < drift['bright'], drift
    counted = {l['label']: v for l, v in metric_samples(plain_text, 'bigmodel_predictions_total', model='fashion')}
    want = np.bincount(pred(x).labels, minlength=10)
    assert counted == {fashion[4][i]: float(c) for i, c in enumerate(want) if c}
    assert metric_samples(plain_text, 'bigmodel_requests_total', model='fashion', endpoint='infer', status='200')[0][1] == 16
    assert sum(histogram_from_metrics(plain_text, 'bigmodel_queue_seconds', model='fashion')[1]) == 16
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == 'bigmodel_nb.serve']
    assert len(lines) == 32 and all(l['endpoint'] == 'infer' and l['status'] == 200 and l['items'] == 32 and l['seconds'] > 0 for l in lines)


def test_triton_export(repo, tmp_path, fashion, pred):
    import onnxruntime as ort
    d = export_triton(repo/'fashion'/'1', tmp_path/'triton', max_batch_size=32)
    cfg = check_triton_config((d/'config.pbtxt').read_text())
    assert cfg.name == 'fashion' and cfg.max_batch_size == 32 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(i.name, list(i.dims)) for i in cfg.input] == [('pixels', [1, 28, 28])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [('logits', [10]), ('probabilities', [10]), ('labels', [1])]
    s = ort.InferenceSession(str(d/'1'/'model.onnx'))
    np.testing.assert_array_equal(s.run(['labels'], {'pixels': fashion[0][:64]})[0], pred(fashion[0][:64]).labels)
    t = check_triton_config((export_triton(repo/'lm'/'1', tmp_path/'triton')/'config.pbtxt').read_text())
    assert [(i.name, list(i.dims)) for i in t.input] == [('tokens', [-1])]
    with pytest.raises(ValueError, match='dynamic_batchin'): check_triton_config('name: "x" dynamic_batchin { }')
    with pytest.raises(Exception, match='checksum'): export_triton(repo/'fashion'/'2', tmp_path/'t2')


def test_graceful_shutdown_sigterm(repo, fashion, pred):
    "Requests in flight when SIGTERM arrives (queued in the batcher, mid-generation) all finish; the process exits 0."
    x = fashion[0]
    proc, url = serve_process(repo, max_delay_ms=1500.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            jobs = [ex.submit(lambda i=i: V2Client(url).infer('fashion', x[i:i + 2], outputs=('labels',))['labels'].tolist()) for i in range(0, 8, 2)]
            jobs.append(ex.submit(lambda: V2Client(url).generate('lm', 'To be', max_tokens=500)))
            time.sleep(0.6); proc.send_signal(signal.SIGTERM)
            res = [j.result(timeout=60) for j in jobs]
        assert sum(res[:4], []) == pred(x[:8]).labels.tolist() and len(res[4]) == 500
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError): httpx.get(f"{url}/v2/health/live")
    finally:
        if proc.poll() is None: proc.kill()


def test_step_serve(repo, fashion, tmp_path):
    x, y = fashion[0][:256], fashion[1][:256]
    out = step_serve(repo/'fashion'/'1', torch.from_numpy(x), y, tmp_path)
    assert out['labels_match'] and out['mismatches'] == 0 and out['errors'] == 0 and out['images'] == 256 and out['requests'] == 64
    assert 0 <= out['served_accuracy'] <= 1 and out['model_calls'] <= 64
    assert (tmp_path/'serving.md').read_text().startswith('## Serving') and (tmp_path/'serving.png').stat().st_size > 5000


@pytest.mark.skipif(os.environ.get('BIGMODEL_NB_FULL') != '1', reason='three processes that each import torch: about a minute on 2 cores; BIGMODEL_NB_FULL=1 runs it')
def test_workers_share_one_port(repo, fashion, pred):
    "--workers 2: two processes behind one port both answer; SIGTERM stops them all with status 0."
    x = fashion[0]
    proc, url = serve_process(repo, workers=2)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            out = list(ex.map(lambda i: V2Client(url).infer('fashion', x[i:i + 4], outputs=('labels',))['labels'].tolist(), range(0, 32, 4)))
        assert sum(out, []) == pred(x[:32]).labels.tolist()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None: proc.kill()


def test_calibrated_package_served_and_exported(repo, fashion, tmp_path):
    "A package with a calibration temperature: the server's and the Triton export's probabilities are the calibrated ones."
    import onnxruntime as ort
    x, _, mean, std, classes = fashion
    torch.manual_seed(1)
    cnn = FashionCNN(CNNConfig(channels=(8, 16), convs=(1, 1))).eval()
    folder = save_package(cnn, tmp_path/'cal', normalize(torch.from_numpy(x[:2]), mean, std),
                          image_config(name='cal', mean=mean, std=std, labels=classes, input_shape=(1, 28, 28)), temperature=2.0)
    p = load_package(folder, threads=1)
    logits = p.logits(x[:16]).astype(np.float64) / 2.0
    want = np.exp(logits - logits.max(1, keepdims=True)); want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(p(x[:16]).probs, want, atol=1e-5)  # the predictor is calibrated
    with ServerThread(create_app(folder)) as url, V2Client(url) as c: served = c.infer('cal', x[:16])['probabilities']
    np.testing.assert_allclose(served, want, atol=1e-5)
    s = ort.InferenceSession(str(export_triton(folder, tmp_path/'triton')/'1'/'model.onnx'))
    np.testing.assert_allclose(s.run(['probabilities'], {'pixels': x[:16]})[0], want, atol=1e-5)
