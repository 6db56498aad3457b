"""The model server under load: throughput and latency of `bigmodel_nb.serve` on the Open Inference Protocol.

Every process is separate, on 127.0.0.1: the server (uvicorn + uvloop + httptools, `create_app` with the no-op
endpoint added), and a load generator (`--loadgen`: raw asyncio sockets on uvloop, keep-alive, TCP_NODELAY, one
request in flight per connection, responses parsed by Content-Length; no HTTP library in the way). On 2 cores the
client competes with the server, so the client's own ceiling comes first: the same load generator against a
minimal asyncio responder (`--echo`) that reads a request and writes a fixed answer.

Then, for concurrency 1, 8, 32 and 64, `BENCH_REQUESTS` (10,000) requests of one Fashion-MNIST test image each
(64 different images, cycled), JSON tensors and binary tensors, against:
- the HTTP floor: `/v2/noop/infer` on the same server, which parses the request exactly as `infer` does and answers
  with outputs of the same shapes, without a model;
- the model server with batching on (`max_batch_size=64`, `max_delay_ms=0`: batches form while the model runs);
- the model server with batching off (`max_batch_size=1`).
References in the same run: the in-process `Predictor` at batch 1 and at 32 and 64 (ms per image), from which the bound on
what batching can win follows: off, a request costs h + m1 (HTTP + the model alone); on, at best h + m32 (32
requests in flight fill at most a batch of 32); the bound is (h + m1) / (h + m32), with h = 1 / floor throughput at c=32.
The choices (model on the event loop, in a thread, or in a process of its own; ONNX Runtime threads; spinning) are
measured at concurrency 32.
The goal's figure comes from its own interleaved rounds, because this machine's speed drifts by a third from one
minute to the next: `GOAL_ROUNDS` rounds of `GOAL_REQUESTS` requests at concurrency 32, each round running the floor
and then the servers back to back, and the median of the per-round ratios server / floor. The server the goal is
measured on is declared here, before the run: `GOAL_SERVER`, the model in a process of its own (`ModelProcess`; the
event loop never waits on the model nor on the GIL) with batches of at most 16 images, so that at concurrency 32 one
batch is in the model while the next one forms. The model on the event loop (the default) is measured in the same
rounds, for reference. `--goal-only` reruns these rounds alone and adds them to the results, under the first run's.
Generation (`--generation-only` reruns it alone, keeping the image part of the results): 16 concurrent streams of
32 tokens each on the concepts chapter's TransformerLM (0.8M parameters, untrained), packaged with its key/value-cache
decoder (`save_package(..., decoder=True)`) and without it; a stream load generator (`--genload`: `measure_generation`,
asyncio on raw sockets) in a process of its own, its ceiling measured first against a minimal streaming responder
(`--sse-echo`); four servers, each in its own process, up at once: decoding one stream at a time
(`generation_batch_size=1`) or up to 16 together, each with its decoding steps in a model process of its own
(`process=True`) or in a worker thread; `GEN_ROUNDS` interleaved rounds, each running every graph on every server
back to back; the figure is the median of the per-round ratios on the server declared here, before the run:
`GEN_GOAL_MODE`, the model in a process of its own (the loop samples and sends tokens while the process decodes the
next step, and neither waits for the other's GIL); the worker thread is measured in the same rounds. With them, the model's own step costs at batch 1
and 16 in-process (16 x step(1) / step(16): what batching the step alone could give). Goal: >= 8x; `--generation-only`'s last line is
`serving generation 16 streams together / one at a time: RATIO`.

Goals: at concurrency 32 the model server reaches >= 0.7x the floor's throughput; batching on/off reaches >= 80% of the
bound; zero errors. Last line: `serving server/floor at c=32: RATIO` (the lower of JSON and binary).
"""
import asyncio, json, os, pickle, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
N_REQ = int(os.environ.get('BENCH_REQUESTS', 10000))
GOAL_ROUNDS, GOAL_REQUESTS = 7, 4000
GOAL_SERVER = dict(process=True, max_batch_size=16)


# ---- the load generator and the minimal responder: no numpy, no torch, so they start in a blink ----

def _install_uvloop():
    try:
        import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError: pass


async def _connection(port, reqs, n, lat, codes):
    r, w = await asyncio.open_connection('127.0.0.1', port)
    w.get_extra_info('socket').setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(n):
        t = time.perf_counter(); w.write(reqs[i % len(reqs)])
        head = await r.readuntil(b'\r\n\r\n')
        low = head.lower(); k = low.index(b'\r\ncontent-length:') + 17
        await r.readexactly(int(low[k:low.index(b'\r\n', k)]))
        lat.append(time.perf_counter() - t); codes.append(int(head[9:12]))
    w.close()


async def _load(port, reqs, concurrency, total):
    lat, codes, per = [], [], [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    t = time.perf_counter()
    await asyncio.gather(*[_connection(port, reqs[i::concurrency] or reqs, n, lat, codes) for i, n in enumerate(per)])
    dt = time.perf_counter() - t
    lat.sort(); q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    return {'requests': len(lat), 'seconds': dt, 'rps': len(lat) / dt, 'p50_ms': q(.5) * 1e3, 'p95_ms': q(.95) * 1e3,
            'p99_ms': q(.99) * 1e3, 'errors': sum(c != 200 for c in codes)}


def loadgen(port, reqfile, concurrency, total):
    _install_uvloop()
    reqs = pickle.loads(Path(reqfile).read_bytes())
    print(json.dumps(asyncio.run(_load(int(port), reqs, int(concurrency), int(total)))))


def genload(port, model, promptfile, max_tokens):
    "Every prompt streamed at once through `measure_generation` (asyncio, raw sockets, one connection per stream)."
    _install_uvloop()
    from bigmodel_nb.serve import measure_generation
    print(json.dumps(measure_generation(f'http://127.0.0.1:{port}', model, json.loads(Path(promptfile).read_text()), int(max_tokens))))


def _raw_server(port, respond):
    "A minimal HTTP/1.1 server: reads each request by Content-Length and calls `respond(writer)` (awaitable) to answer it."
    _install_uvloop()
    async def handle(r, w):
        w.get_extra_info('socket').setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await r.readuntil(b'\r\n\r\n'); low = head.lower(); k = low.index(b'\r\ncontent-length:') + 17
                await r.readexactly(int(low[k:low.index(b'\r\n', k)])); await respond(w)
        except (asyncio.IncompleteReadError, ConnectionError): w.close()
    async def main():
        srv = await asyncio.start_server(handle, '127.0.0.1', int(port)); print('ready', flush=True)
        async with srv: await srv.serve_forever()
    asyncio.run(main())


def sse_echo(port, tokens):
    "A minimal streaming responder: answers each request with `tokens` server-sent events, one chunk each (the stream client's ceiling)."
    head = b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n'
    event = b'data: {"model_name":"m","model_version":"1","text_output":"a"}\n\n'
    chunk = b'%x\r\n' % len(event) + event + b'\r\n'
    async def respond(w):
        w.write(head)
        for _ in range(int(tokens)): w.write(chunk); await asyncio.sleep(0)  # one write per event, as the server does
        w.write(b'0\r\n\r\n')
    _raw_server(port, respond)


def echo(port):
    "A minimal HTTP/1.1 responder: answers each request 200 with a small fixed body."
    answer = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}'
    async def respond(w): w.write(answer)
    _raw_server(port, respond)


def server(repo, port, opts):
    "The model server with the no-op endpoint, as `serve_command` runs it (request log included)."
    import logging, uvicorn
    from bigmodel_nb.serve import create_app, log
    opts = json.loads(opts)
    if opts.pop('log', True):  # one JSON line per request, as `serve_command` writes them (to a file here)
        h = logging.FileHandler(Path(repo).parent/f'requests-{port}.log'); h.setFormatter(logging.Formatter('%(message)s'))
        log.addHandler(h); log.setLevel(logging.INFO)
    app = create_app(repo, noop=True, **opts)
    uvicorn.run(app, host='127.0.0.1', port=int(port), access_log=False, log_level='warning')


# ---- the driver ----

def request_bytes(path, x, binary):
    spec = {'name': 'pixels', 'shape': list(x.shape), 'datatype': 'UINT8'}
    outs = [{'name': 'labels', 'parameters': {'binary_data': binary}}, {'name': 'probabilities', 'parameters': {'binary_data': binary}}]
    if binary:
        head = json.dumps({'inputs': [{**spec, 'parameters': {'binary_data_size': x.nbytes}}], 'outputs': outs}).encode()
        body, extra = head + x.tobytes(), f'inference-header-content-length: {len(head)}\r\n'
    else: body, extra = json.dumps({'inputs': [{**spec, 'data': x.ravel().tolist()}], 'outputs': outs}).encode(), ''
    return (f'POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n').encode() + body


def run_load(port, reqfile, concurrency, total=N_REQ):
    out = subprocess.run([sys.executable, __file__, '--loadgen', str(port), str(reqfile), str(concurrency), str(total)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def start(args, port, ready_url=None):
    import httpx
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE if ready_url is None else None, text=True)
    if ready_url is None: proc.stdout.readline(); return proc
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200: return proc
        except httpx.HTTPError: time.sleep(0.2)
    proc.kill(); raise RuntimeError('server did not start')


def stop(proc):
    proc.terminate(); proc.wait(timeout=60)


GEN_STREAMS, GEN_TOKENS, GEN_PROMPT, GEN_ROUNDS = 16, 32, 24, 7
GEN_GOAL_MODE = 'model process'  # the server the generation goal is measured on, declared before the run


def generation(tmp):
    """The generation part: 16 concurrent streams through the server (its own process) from the stream load generator
    (its own process), decoded one at a time vs together, with and without the package's key/value-cache decoder.
    Returns the results' lines and the goal's line."""
    import numpy as np, torch
    from bigmodel_nb.concepts import markdown_table, time_calls, TransformerConfig, TransformerLM, free_port
    from bigmodel_nb.data import load_shakespeare, CharTokenizer
    from bigmodel_nb.deploy import save_package, token_config, load_package
    torch.set_num_threads(1)
    text = str(load_shakespeare(verbose=False))[:200000]; tok = CharTokenizer(text)
    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, n_ctx=128, d_model=128, n_layers=4, n_heads=4)).eval()
    n_params = sum(q.numel() for q in lm.parameters())
    repo, example = tmp/'gen-repo', torch.stack([tok.encode(text[:16]), tok.encode(text[16:32])])
    t0 = time.perf_counter()
    save_package(lm, repo/'char-gpt'/'1', example, token_config(tok, 128, name='char-gpt'), decoder=True)
    save_package(lm, repo/'char-gpt-window'/'1', example, token_config(tok, 128, name='char-gpt-window'))
    print(f'packaged in {time.perf_counter() - t0:.1f} s', flush=True)
    # the model's own step costs in-process (1 ONNX Runtime thread, not spinning), at the lengths the streams pass through
    lp = load_package(repo/'char-gpt'/'1', threads=1, spin=False)
    x = np.stack([tok.encode(text[i * 997:i * 997 + 56]).numpy() for i in range(GEN_STREAMS)])
    step_ms = {}
    for b in (1, GEN_STREAMS):
        for t in (GEN_PROMPT, GEN_PROMPT + GEN_TOKENS):
            step_ms['full window', b, t] = float(np.median(time_calls(lambda: lp.logits(x[:b, :t]), 40, 5))) * 1e3
            kb = lp.kv_batch(); kb.add(x[:b, :t - 1].tolist())
            def cached(): kb.step(x[:b, t - 1]); kb.lens -= 1  # the same step again
            step_ms['key/value cache', b, t] = float(np.median(time_calls(cached, 200, 20))) * 1e3
    print(step_ms, flush=True)
    prompts = tmp/'gen-prompts.json'; prompts.write_text(json.dumps([text[i * 997:i * 997 + GEN_PROMPT] for i in range(GEN_STREAMS)]))
    # the stream client's own ceiling: the same requests against a responder that streams GEN_TOKENS events at once
    port = free_port(); echo_proc = start(['--sse-echo', str(port), str(GEN_TOKENS)], port)
    ceiling = sorted((run_gen(port, 'char-gpt', prompts) for _ in range(5)), key=lambda r: r['tokens_per_s'])[2]
    stop(echo_proc); print(f"stream client ceiling: {ceiling['tokens_per_s']:.0f} tokens/s", flush=True)
    # every server up at once (the idle ones sleep); each round runs every graph on every server, back to back
    decodings = {1: 'one at a time', GEN_STREAMS: f'{GEN_STREAMS} together'}
    modes = {'model process': dict(process=True), 'worker thread': {}}  # the first is the goal's (GEN_GOAL_MODE)
    keys = [(mode, gb) for mode in modes for gb in decodings]
    ports = {k: free_port() for k in keys}
    procs = {}
    try:
        for mode, gb in keys:
            opts = dict(threads=1, spin=False, generation_batch_size=gb, max_queue=4096, **modes[mode])
            procs[mode, gb] = start(['--server', str(repo), str(ports[mode, gb]), json.dumps(opts)], ports[mode, gb], f'http://127.0.0.1:{ports[mode, gb]}/v2/health/ready')
        graphs = {'key/value cache': 'char-gpt', 'full window': 'char-gpt-window'}
        runs = {}  # (graph, mode, decoding) -> one result per round
        for k in keys:
            for model in graphs.values(): run_gen(ports[k], model, prompts, 4)  # warm-up
        for r in range(GEN_ROUNDS):
            for label, model in graphs.items():
                for mode, gb in keys: runs.setdefault((label, mode, decodings[gb]), []).append(run_gen(ports[mode, gb], model, prompts))
            print(f'round {r}: ' + ', '.join(f'{g}, {m}, {d}: {v[-1]["tokens_per_s"]:.0f}' for (g, m, d), v in runs.items()), flush=True)
    finally:
        for proc in procs.values(): stop(proc)
    gen = [{'graph': g, 'model runs in': m, 'decoding': d, **sorted(v, key=lambda r: r['tokens_per_s'])[GEN_ROUNDS // 2]} for (g, m, d), v in runs.items()]  # the median run
    get = lambda g, d, m=GEN_GOAL_MODE: next(r for r in gen if r['graph'] == g and r['decoding'] == d and r['model runs in'] == m)
    per_round = {(g, m): [b['tokens_per_s'] / a['tokens_per_s'] for a, b in zip(runs[g, m, decodings[1]], runs[g, m, decodings[GEN_STREAMS]])]
                 for g in graphs for m in modes}
    ratio = {k: float(np.median(v)) for k, v in per_round.items()}
    bound = {g: np.mean([GEN_STREAMS * step_ms[g, 1, t] / step_ms[g, GEN_STREAMS, t] for t in (GEN_PROMPT, GEN_PROMPT + GEN_TOKENS)]) for g in graphs}
    step_mean = lambda g, b: np.mean([step_ms[g, b, t] for t in (GEN_PROMPT, GEN_PROMPT + GEN_TOKENS)])
    lines = [f'## Generation: {GEN_STREAMS} concurrent streams, {GEN_TOKENS} tokens each after a {GEN_PROMPT}-character prompt, '
             f'TransformerLM ({n_params:,} parameters, char vocabulary of {tok.vocab_size}, untrained)', '',
             'Each server in its own process (1 ONNX Runtime thread, not spinning), its decoding steps in a model process of its own (`process=True`, the goal\'s server) or in a worker thread; the load generator '
             '(`--genload`: `measure_generation`, asyncio on raw sockets, TCP_NODELAY, one connection per stream, server-sent events counted as they arrive) '
             f'in another. All four servers (model process or worker thread; one at a time or {GEN_STREAMS} together) run at once; {GEN_ROUNDS} interleaved rounds, each running every '
             'graph on every server back to back, so a drift in the machine\'s speed hits every arm alike. Each row: the median run of its rounds by tokens per '
             'second; the ratios: the median of the per-round ratios. The same package twice: with its `decoder.onnx` '
             '(key/value cache) and without it (the whole window each step).', '',
             f'Stream client ceiling (the load generator against a minimal responder that streams {GEN_TOKENS} events per request, '
             f'{GEN_STREAMS} streams at once): {ceiling["tokens_per_s"]:.0f} tokens/s.', '',
             markdown_table(gen, ['graph', 'model runs in', 'decoding', 'streams', 'tokens', 'errors', 'seconds', 'tokens_per_s', 'ttft_median_s', 'ttft_max_s'],
                            fmt={'seconds': '.2f', 'tokens_per_s': '.0f', 'ttft_median_s': '.4f', 'ttft_max_s': '.4f'}), '',
             'One decoding step in-process, ms (1 thread): ' + ', '.join(f'{g}, batch {b} at {t} tokens: {v:.3f}' for (g, b, t), v in step_ms.items()) + '.', '']
    for g in graphs:
        for m in modes:
            one, tog = get(g, decodings[1], m)['tokens_per_s'], get(g, decodings[GEN_STREAMS], m)['tokens_per_s']
            lines.append(f'- {g}, {m}: {GEN_STREAMS} together / one at a time = {ratio[g, m]:.2f}x (rounds {min(per_round[g, m]):.2f}-{max(per_round[g, m]):.2f}x). '
                         f'Per token, one at a time: {1e3 / one:.3f} ms served; together: {GEN_STREAMS * 1e3 / tog:.3f} ms per step of {GEN_STREAMS} tokens served')
        lines.append(f'- {g}: what batching the model\'s step alone could give, {GEN_STREAMS} x step(1) / step({GEN_STREAMS}) averaged over {GEN_PROMPT} and '
                     f'{GEN_PROMPT + GEN_TOKENS} tokens: {bound[g]:.2f}x (the step: {step_mean(g, 1):.3f} ms at batch 1, {step_mean(g, GEN_STREAMS):.3f} ms at batch {GEN_STREAMS})')
    lines.append(f'- time to first token (median, {GEN_GOAL_MODE}): key/value cache {get("key/value cache", "one at a time")["ttft_median_s"] * 1e3:.1f} ms one at a time, '
                 f'{get("key/value cache", f"{GEN_STREAMS} together")["ttft_median_s"] * 1e3:.1f} ms together')
    lines.append(f'- errors over all runs: {sum(r["errors"] for v in runs.values() for r in v)}')
    goal = ratio['key/value cache', GEN_GOAL_MODE]
    lines.append(f'\nGoal: {GEN_STREAMS} together >= 8x the tokens per second of one at a time ({GEN_GOAL_MODE}, key/value cache): {goal:.2f}x '
                 f'({"met" if goal >= 8 else "NOT met"}).')
    return lines, f"serving generation {GEN_STREAMS} streams together / one at a time: {goal:.2f}"


def run_gen(port, model, promptfile, max_tokens=GEN_TOKENS):
    out = subprocess.run([sys.executable, __file__, '--genload', str(port), model, str(promptfile), str(max_tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def generation_only():
    "Rerun the generation part alone, keeping the image part of bench/results/serving.md."
    from _results import write_results, RESULTS
    from bigmodel_nb.concepts import machine_info
    info = machine_info(); print(info, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix='bench-serving-'))
    old = (RESULTS/'serving.md').read_text().split('\n', 2)[2] if (RESULTS/'serving.md').is_file() else ''
    head = old[:old.index('## Generation')] if '## Generation' in old else old
    head = ''.join(l for l in head.splitlines(True) if not l.startswith('Generation part rerun alone'))
    head = head.rstrip('\n') + '\n\n'
    lines, figure = generation(tmp)
    write_results('serving', 'Model server under load', head + f'Generation part rerun alone on {info}.\n\n' + '\n'.join(lines))
    shutil.rmtree(tmp, ignore_errors=True)
    print(figure)


def image_setup(tmp):
    "The CNN packaged in a repository under `tmp`, and the request files (64 test images, one per request): `(ds, cnn, full, repo, reqfiles)`."
    from bigmodel_nb.data import channel_stats, load_fashion_mnist, normalize
    from bigmodel_nb.deploy import save_package, image_config
    from bigmodel_nb.cnn import get_trained_cnn, cnn_path
    ds = load_fashion_mnist(verbose=False); mean, std = channel_stats(ds.x_train)
    full = cnn_path(False).is_file()
    cnn = get_trained_cnn(quick=not full, verbose=False)
    repo = tmp/'repo'
    save_package(cnn, repo/'fashion'/'1', normalize(ds.x_test[:2], mean, std),
                 image_config(name='fashion', mean=mean, std=std, labels=ds.classes, input_shape=(1, 28, 28)))
    x = ds.x_test[:64].numpy()
    reqfiles = {}
    for path in ('/v2/noop/infer', '/v2/models/fashion/infer'):
        for binary in (False, True):
            f = tmp/f"req-{len(reqfiles)}.pkl"; f.write_bytes(pickle.dumps([request_bytes(path, x[i:i + 1], binary) for i in range(64)]))
            reqfiles[path, binary] = f
    return ds, cnn, full, repo, reqfiles


BASE_SERVER = dict(threads=1, spin=False, threaded=False, max_queue=4096)
GOAL_SERVERS = {'model on the event loop': {**BASE_SERVER, 'max_batch_size': 64}, 'model in its own process, batches <= 16': {**BASE_SERVER, **GOAL_SERVER}}


def goal_rounds(repo, reqfiles):
    "The goal's interleaved rounds at concurrency 32: `(rows, lines)`, one row per server and tensor type (median ratio over rounds)."
    import numpy as np
    from bigmodel_nb.concepts import markdown_table, free_port
    procs, ports = [], {}
    try:
        for label, opts in GOAL_SERVERS.items():
            port = free_port(); procs.append(start(['--server', str(repo), str(port), json.dumps(opts)], port, f'http://127.0.0.1:{port}/v2/health/ready'))
            ports[label] = port
        floor_port = ports['model on the event loop']
        rounds = {(label, t): [] for label in GOAL_SERVERS for t in ('JSON', 'binary')}
        for binary in (False, True):
            for label in GOAL_SERVERS: run_load(ports[label], reqfiles['/v2/models/fashion/infer', binary], 32, 500)  # warm-up
        for i in range(GOAL_ROUNDS):
            for binary, t in ((False, 'JSON'), (True, 'binary')):
                floor = run_load(floor_port, reqfiles['/v2/noop/infer', binary], 32, GOAL_REQUESTS)
                for label in GOAL_SERVERS:
                    r = run_load(ports[label], reqfiles['/v2/models/fashion/infer', binary], 32, GOAL_REQUESTS)
                    rounds[label, t].append({'ratio': r['rps'] / floor['rps'], 'floor': floor['rps'], 'rps': r['rps'], 'errors': r['errors'] + floor['errors']})
            print(f"goal round {i + 1}: " + ', '.join(f"{l} {t} {v[-1]['ratio']:.3f}" for (l, t), v in rounds.items()), flush=True)
    finally:
        for proc in procs: stop(proc)
    med = lambda v, k: float(np.median([r[k] for r in v]))
    rows = [{'server': label, 'tensors': t, 'rounds': len(v), 'floor_rps': med(v, 'floor'), 'rps': med(v, 'rps'), 'ratio': med(v, 'ratio'),
             'low': min(r['ratio'] for r in v), 'high': max(r['ratio'] for r in v), 'errors': sum(r['errors'] for r in v)}
            for (label, t), v in rounds.items()]
    lines = ['Each round runs the floor, then each server, back to back; the ratio is taken within the round, and the table gives '
             'the median over rounds (with the lowest and highest ratio).', '',
             markdown_table(rows, ['server', 'tensors', 'rounds', 'floor_rps', 'rps', 'ratio', 'low', 'high', 'errors'],
                            {'floor_rps': 'floor requests/s', 'rps': 'server requests/s', 'ratio': 'server / floor'},
                            {'floor_rps': '.0f', 'rps': '.0f', 'ratio': '.3f', 'low': '.3f', 'high': '.3f'}), '']
    return rows, lines


def goal_only():
    "Rerun the goal's interleaved rounds alone; the run is added to bench/results/serving.md under the first one."
    import torch
    from _results import write_results, RESULTS
    from bigmodel_nb.concepts import machine_info
    torch.set_num_threads(1)
    info = machine_info(); print(info, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix='bench-serving-'))
    _, _, _, repo, reqfiles = image_setup(tmp)
    rows, lines = goal_rounds(repo, reqfiles)
    old = (RESULTS/'serving.md').read_text().split('\n', 2)[2]
    k = old.index('## Goals at concurrency 32')
    ratio = min(r['ratio'] for r in rows if r['server'] != 'model on the event loop')
    extra = [f'### Rerun alone ({time.strftime("%Y-%m-%d %H:%M")}, `--goal-only`, {info})', '', *lines,
             f'In this rerun, server / floor with the model in its own process, batches <= 16: {ratio:.3f} (the lower of JSON and binary).', '', '']
    write_results('serving', 'Model server under load', old[:k] + '\n'.join(extra) + old[k:])
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"serving server/floor at c=32 (goal rounds alone): {ratio:.3f}")


def main():
    import numpy as np, torch
    from _results import write_results
    from bigmodel_nb.concepts import machine_info, markdown_table, time_calls, free_port
    from bigmodel_nb.deploy import load_package
    torch.set_num_threads(1)
    info = machine_info(); print(info, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix='bench-serving-'))
    ds, cnn, full, repo, reqfiles = image_setup(tmp)
    # the in-process model costs, as the server runs it (1 ONNX Runtime thread, not spinning)
    p = load_package(repo/'fashion'/'1', threads=1, spin=False)
    model_ms = {b: float(np.median(time_calls(lambda: p(ds.x_test[:b].numpy()), 300 if b == 1 else 60, 20))) / b * 1e3 for b in (1, 32, 64)}
    print(f"in-process Predictor, ms per image: {model_ms}", flush=True)

    # the client's ceiling
    port = free_port(); echo_proc = start(['--echo', str(port)], port)
    ceiling = {c: run_load(port, reqfiles['/v2/models/fashion/infer', b], c) for c in (32,) for b in (False,)}
    ceiling_bin = run_load(port, reqfiles['/v2/models/fashion/infer', True], 32)
    stop(echo_proc)
    print(f"client ceiling at c=32: JSON {ceiling[32]['rps']:.0f} req/s, binary {ceiling_bin['rps']:.0f} req/s", flush=True)

    rows = []
    def serve_and_load(label, opts, targets, concs=(1, 8, 32, 64)):
        port = free_port(); proc = start(['--server', str(repo), str(port), json.dumps(opts)], port, f'http://127.0.0.1:{port}/v2/health/ready')
        try:
            for c in concs:
                for path, name in targets:
                    for binary in (False, True):
                        run_load(port, reqfiles[path, binary], c, 500)  # warm-up
                        r = run_load(port, reqfiles[path, binary], c)
                        rows.append({'server': name if name else label, 'tensors': 'binary' if binary else 'JSON', 'concurrency': c, **r})
                        print(rows[-1], flush=True)
        finally: stop(proc)
    base = BASE_SERVER
    serve_and_load('batching on', {**base, 'max_batch_size': 64}, [('/v2/noop/infer', 'floor (no-op)'), ('/v2/models/fashion/infer', 'batching on')])
    serve_and_load('batching off', {**base, 'max_batch_size': 1}, [('/v2/models/fashion/infer', 'batching off')])
    choices = []
    for label, o in [('model in a worker thread', dict(threaded=True)), ('model in a worker thread, batches <= 16', dict(threaded=True, max_batch_size=16)),
                     ('2 ORT threads, not spinning', dict(threads=2)), ('2 ORT threads, spinning', dict(threads=2, spin=True)),
                     ('model in its own process', dict(process=True)), ('model in its own process, batches <= 16', dict(process=True, max_batch_size=16))]:
        before = len(rows)
        serve_and_load(label, {**base, 'max_batch_size': 64, **o}, [('/v2/models/fashion/infer', label)], concs=(32,))
        choices += rows[before:]; del rows[before:]

    # the goal: interleaved rounds of the floor, the model on the event loop, and GOAL_SERVER
    goal_rows, goal_lines = goal_rounds(repo, reqfiles)
    goal_ratio = {r['tensors']: r['ratio'] for r in goal_rows if r['server'] != 'model on the event loop'}

    # goals
    get = lambda s, t, c: next(r for r in rows if r['server'] == s and r['tensors'] == t and r['concurrency'] == c)
    ratio = {t: get('batching on', t, 32)['rps'] / get('floor (no-op)', t, 32)['rps'] for t in ('JSON', 'binary')}
    bound, achieved = {}, {}
    for t in ('JSON', 'binary'):
        h = 1e3 / get('floor (no-op)', t, 32)['rps']  # ms per request
        bound[t] = (h + model_ms[1]) / (h + model_ms[32])  # at concurrency 32 a batch holds at most 32 requests
        achieved[t] = get('batching on', t, 32)['rps'] / get('batching off', t, 32)['rps']
    errors = sum(r['errors'] for r in rows + choices + goal_rows)
    ms = lambda v: f'{v:.2f}'
    cols = ['server', 'tensors', 'concurrency', 'requests', 'rps', 'p50_ms', 'p95_ms', 'p99_ms', 'errors']
    hdr = {'rps': 'requests/s', 'p50_ms': 'p50 (ms)', 'p95_ms': 'p95 (ms)', 'p99_ms': 'p99 (ms)'}
    fmt = {'rps': '.0f', 'p50_ms': ms, 'p95_ms': ms, 'p99_ms': ms}
    lines = [f'Machine: {info}. Server: uvicorn (uvloop, httptools), 1 process, ONNX Runtime 1 thread, not spinning, model on the event loop '
             f'(unless the row says otherwise). CNN: {"the full trained model" if full else "the quick model"} ({sum(q.numel() for q in cnn.parameters()):,} parameters).', '',
             f'Client ceiling (the load generator against a minimal asyncio responder, concurrency 32, the same requests): '
             f'{ceiling[32]["rps"]:.0f} requests/s with JSON bodies, {ceiling_bin["rps"]:.0f} with binary bodies.', '',
             f'In-process Predictor (1 thread), ms per image: batch 1 {model_ms[1]:.3f}, batch 32 {model_ms[32]:.3f}, batch 64 {model_ms[64]:.3f}.', '',
             '## Requests of one image each', '', markdown_table(rows, cols, hdr, fmt), '',
             '## Choices at concurrency 32 (batching on)', '', markdown_table(choices, cols, hdr, fmt), '',
             f'## The goal at concurrency 32: {GOAL_ROUNDS} interleaved rounds of {GOAL_REQUESTS:,} requests', '', *goal_lines,
             '## Goals at concurrency 32', '']
    for t in ('JSON', 'binary'):
        lines.append(f'- {t}: server / floor = {goal_ratio[t]:.3f} with the model in its own process, batches <= 16, interleaved rounds (goal >= 0.7); '
                     f'{ratio[t]:.3f} for the model on the event loop in the table above; batching on/off = {achieved[t]:.3f}x of a bound '
                     f'(h + m1)/(h + m32) = {bound[t]:.3f}x with h = {1e3 / get("floor (no-op)", t, 32)["rps"]:.3f} ms: {achieved[t] / bound[t]:.0%} of it (goal >= 80%)')
    lines += [f'- errors over all runs: {errors} (goal 0)', '']
    gen_lines, gen_figure = generation(tmp)
    lines += gen_lines
    write_results('serving', 'Model server under load', '\n'.join(lines))
    shutil.rmtree(tmp, ignore_errors=True)
    print(gen_figure)
    for t in ('JSON', 'binary'): print(f"batching on/off {t}: {achieved[t]:.2f}x of bound {bound[t]:.2f}x = {achieved[t] / bound[t]:.0%}")
    print(f"errors: {errors}")
    print(f"serving server/floor at c=32: {min(goal_ratio.values()):.3f}")


if __name__ == '__main__':
    if sys.argv[1:2] == ['--loadgen']: loadgen(*sys.argv[2:6])
    elif sys.argv[1:2] == ['--echo']: echo(sys.argv[2])
    elif sys.argv[1:2] == ['--server']: server(*sys.argv[2:5])
    elif sys.argv[1:2] == ['--genload']: genload(*sys.argv[2:6])
    elif sys.argv[1:2] == ['--sse-echo']: sse_echo(*sys.argv[2:4])
    elif sys.argv[1:2] == ['--generation-only']: generation_only()
    elif sys.argv[1:2] == ['--goal-only']: goal_only()
    else: sys.exit(main())
