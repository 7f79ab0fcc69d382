"""Handler mode in-process: a model served through its own ``code/inference.py``.

The handlers are written the way SageMaker PyTorch users write them; the app is the real one.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from serve import handlers
from serve.app import create_app
from serve.batching import Batcher
from serve.handlers import HandlerModel
from serve.settings import Settings

from artifacts import constant_artifact

# A linear model whose answer is known: y = 2x summed over the features.
INFERENCE_PY = textwrap.dedent('''
    import json, os, threading, time
    import numpy as np
    import torch

    STARTED, RELEASE = threading.Event(), threading.Event()

    def model_fn(model_dir):
        model = torch.nn.Linear(3, 1, bias=False)
        model.load_state_dict(torch.load(os.path.join(model_dir, "model.pth"), weights_only=True))
        return model.eval()

    def input_fn(body, content_type):
        if content_type != "application/json":
            raise ValueError(f"expected JSON, got {content_type}")
        data = json.loads(body)  # a str for application/json, as in SageMaker's container
        if data.get("wait"):
            STARTED.set()
            RELEASE.wait(30)
        if data.get("explode"):
            return "explode"
        return torch.tensor(data["inputs"], dtype=torch.float32)

    def predict_fn(data, model):
        if isinstance(data, str):
            raise RuntimeError("the model exploded")
        with torch.no_grad():
            return model(data)
''')


def model_folder(root: Path, inference_py: str = INFERENCE_PY, **files: str) -> Path:
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / "model.pth")
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text(inference_py)
    for name, text in files.items():
        (root / "code" / name).write_text(text)
    return root


def wait_for(client: TestClient, status: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while (body := client.get("/ping").json())["status"] != status:
        assert body["status"] == "loading" and time.monotonic() < deadline, body
        time.sleep(0.02)
    return body


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, HandlerModel]]:
    model_dir = model_folder(tmp_path / "model")
    settings = Settings(model_dir=model_dir, request_timeout_s=2.0, max_queue=0)
    loaded: list[HandlerModel] = []

    def load() -> HandlerModel:
        loaded.append(HandlerModel.load(model_dir, module_name=f"inference_{id(settings)}"))
        return loaded[0]

    with TestClient(create_app(settings, load), raise_server_exceptions=False) as client:
        wait_for(client, "ready")
        yield client, loaded[0]


def post(client: TestClient, payload: object, content_type: str = "application/json", **headers: str):
    return client.post("/invocations", content=json.dumps(payload).encode(),
                       headers={"Content-Type": content_type, **headers})


def test_the_users_functions_answer_with_the_default_output_fn(served) -> None:
    client, _ = served
    response = post(client, {"inputs": [[1, 2, 3], [0, 0, 1]]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == [[12.0], [2.0]]
    assert response.headers["server-timing"].startswith("queue;dur=") and ", handlers;dur=" in response.headers[
        "server-timing"]
    npy = post(client, {"inputs": [[1, 1, 1]]}, Accept="application/x-npy")
    assert npy.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content)), [[6.0]])
    csv = post(client, {"inputs": [[1, 1, 1], [1, 0, 0]]}, Accept="text/csv")
    assert csv.text.splitlines() == ["6.0", "2.0"]


def test_input_fn_refusing_the_body_is_a_400_naming_its_message(served) -> None:
    client, _ = served
    response = post(client, {"inputs": [1]}, "text/plain")
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "invalid_input",
                                         "message": "input_fn: ValueError: expected JSON, got text/plain"}
    assert post(client, {"no_inputs": 1}).status_code == 400  # a KeyError in input_fn: the body's fault


def test_predict_fn_failing_is_a_500_with_a_request_id_and_the_server_stays_healthy(served, caplog) -> None:
    client, _ = served
    response = post(client, {"explode": True})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "handler_error"
    assert "RuntimeError: the model exploded" in response.json()["error"]["message"]
    assert response.headers["x-request-id"]
    assert "Traceback" in caplog.text and "the model exploded" in caplog.text
    assert client.get("/ping").status_code == 200
    assert post(client, {"inputs": [[1, 1, 1]]}).json() == [[6.0]]


def test_a_handler_past_the_timeout_is_a_504_and_one_beyond_the_queue_a_503(served) -> None:
    """One handler thread and no queue: a request arriving while a stuck one runs is refused."""
    client, loaded = served
    started, release = (loaded.functions["input_fn"].__globals__[name] for name in ("STARTED", "RELEASE"))
    answers: list = []
    stuck = threading.Thread(target=lambda: answers.append(post(client, {"wait": True})))
    stuck.start()
    try:
        assert started.wait(10)
        refused = post(client, {"inputs": [[1, 1, 1]]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert client.get("/ping").status_code == 200  # /ping never waits for user code
        stuck.join(30)
        assert answers[0].status_code == 504 and answers[0].json()["error"]["code"] == "timeout"
        # The stuck call still holds the only thread until it returns: still refused, not queued.
        assert post(client, {"inputs": [[1, 1, 1]]}).status_code == 503
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while (response := post(client, {"inputs": [[1, 1, 1]]})).status_code == 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert response.json() == [[6.0]]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_default_handlers_serve_a_torchscript_model(tmp_path: Path) -> None:
    model = torch.jit.script(torch.nn.Linear(2, 1, bias=False).eval())
    with torch.no_grad():
        model.weight.fill_(1.0)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text("# no functions: every default\n")
    model.save(str(tmp_path / "model.pt"))
    settings = Settings(model_dir=tmp_path)
    loader = lambda: HandlerModel.load(tmp_path, module_name="inference_defaults")
    with TestClient(create_app(settings, loader), raise_server_exceptions=False) as client:
        wait_for(client, "ready")
        assert post(client, [[1.0, 2.0]]).json() == [[3.0]]
        csv = client.post("/invocations", content=b"1,2\n3,4\n", headers={"Content-Type": "text/csv"})
        assert csv.json() == [[3.0], [7.0]]
        unsupported = client.post("/invocations", content=b"x", headers={"Content-Type": "image/png"})
        assert unsupported.status_code == 415
        refused = post(client, [[1.0, 2.0]], Accept="image/png")
        assert refused.status_code == 406


def test_transform_fn_with_context_sees_the_request_headers(tmp_path: Path) -> None:
    model_dir = model_folder(tmp_path / "model", textwrap.dedent('''
        def model_fn(model_dir, context):
            return {"dir": context.system_properties["model_dir"]}

        def transform_fn(model, body, content_type, accept, context):
            attributes = context.get_request_header(0, "X-Amzn-SageMaker-Custom-Attributes")
            return f"{type(body).__name__} {content_type} {attributes}", "text/plain"
    '''))
    loader = lambda: HandlerModel.load(model_dir, module_name="inference_transform")
    with TestClient(create_app(Settings(model_dir=model_dir), loader), raise_server_exceptions=False) as client:
        wait_for(client, "ready")
        response = client.post("/invocations", content=b"\x00\x01", headers={
            "Content-Type": "application/octet-stream", "X-Amzn-SageMaker-Custom-Attributes": "trace=1"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text == "bytes application/octet-stream trace=1"


@pytest.mark.parametrize(("inference_py", "requirements", "reason"), [
    ("def transform_fn(m, b, c, a): pass\ndef input_fn(b, c): pass\n", None, "defines transform_fn and also"),
    ("def model_fn(model_dir):\n    raise OSError('weights missing')\n", None, "OSError: weights missing"),
    ("def input_fn(a, b, c, d): pass\n", None, "input_fn takes 4 arguments; expected 2, or 3 with context"),
    ("", "this is ::: not a requirement\n", "pip could not install code/requirements.txt"),
])
def test_a_model_that_cannot_load_keeps_ping_503_with_the_reason(tmp_path: Path, inference_py: str,
                                                                  requirements: str | None, reason: str) -> None:
    files = {"requirements.txt": requirements} if requirements else {}
    model_dir = model_folder(tmp_path / "model", inference_py, **files)
    loader = lambda: HandlerModel.load(model_dir, module_name=f"inference_broken_{len(reason)}")
    with TestClient(create_app(Settings(model_dir=model_dir), loader), raise_server_exceptions=False) as client:
        body = wait_for(client, "failed")
        assert reason in body["reason"]


def test_handler_mode_is_chosen_by_the_code_or_sagemaker_program(tmp_path: Path) -> None:
    assert not handlers.has_handlers(tmp_path, None)
    assert handlers.has_handlers(tmp_path, "serve.py")
    model_folder(tmp_path / "model")
    assert handlers.has_handlers(tmp_path / "model", None)
    submitted = tmp_path / "submitted"
    submitted.mkdir()
    (submitted / "handler.py").write_text("")
    assert handlers.code_folder(tmp_path, "handler.py", f"file://{submitted}") == submitted


def test_the_default_predict_fn_gets_the_model_on_the_inputs_device(tmp_path: Path, monkeypatch) -> None:
    """model_fn may load onto the CPU; the default input_fn puts data on the GPU when there is one."""
    model_dir = model_folder(tmp_path / "model", textwrap.dedent('''
        import torch
        MOVED = []

        class Doubler(torch.nn.Module):
            def forward(self, x):
                return x * 2

            def to(self, *args, **kwargs):
                MOVED.append(args)
                return super().to(*args, **kwargs)

        def model_fn(model_dir):
            return Doubler()
    '''))
    model = HandlerModel.load(model_dir, module_name="inference_device")
    assert model.functions["model_fn"].__globals__["MOVED"] == [(model.device,)]
    body, kind = model.invoke(b"[1, 2]", "application/json", None)
    assert (json.loads(body), kind) == ([2.0, 4.0], "application/json")


@pytest.mark.parametrize("accept", [None, "*/*"])
def test_transform_fn_gets_the_default_accept_for_a_missing_or_wildcard_one(tmp_path: Path, accept) -> None:
    model_dir = model_folder(tmp_path / "model", "def model_fn(model_dir):\n    return None\n\n"
                                                 "def transform_fn(model, body, content_type, accept):\n"
                                                 "    return accept\n")
    model = HandlerModel.load(model_dir, module_name=f"inference_accept_{accept is None}", default_accept="text/csv")
    assert model.invoke(b"x", "application/octet-stream", accept) == (b"text/csv", "text/csv")


def test_requirements_are_installed_before_the_server_imports_torch(tmp_path: Path) -> None:
    from serve import server as entry

    model_dir = model_folder(tmp_path / "model", "", **{"requirements.txt": "this is ::: not a requirement\n"})
    reason = entry.install_requirements(Settings(model_dir=model_dir))
    assert reason is not None and "pip could not install code/requirements.txt" in reason
    with pytest.raises(RuntimeError, match="pip could not install"):
        entry.load_predictor(Settings(model_dir=model_dir), reason)
    assert entry.install_requirements(Settings(model_dir=tmp_path / "no-code")) is None


# Rows in, rows out: y = 2x summed over the features, for any number of rows. The first call of
# predict_fn waits to be released, so the requests that arrive meanwhile queue up behind it.
BATCHED_PY = textwrap.dedent('''
    import json, os, threading
    import torch

    STARTED, RELEASE, CALLS = threading.Event(), threading.Event(), []

    def model_fn(model_dir):
        model = torch.nn.Linear(3, 1, bias=False)
        model.load_state_dict(torch.load(os.path.join(model_dir, "model.pth"), weights_only=True))
        return model.eval()

    def input_fn(body, content_type):
        data = json.loads(body)
        if "shape_only" in data:
            return {"not": "a tensor"}
        return torch.tensor(data["inputs"], dtype=torch.float32)

    def predict_fn(data, model, context):
        CALLS.append((len(data), dict(context.request_headers)))
        if len(CALLS) == 1:
            STARTED.set()
            RELEASE.wait(30)
        with torch.no_grad():
            output = model(data)
        return output[:1] if (data == 9).all(dim=1).any() else output

    def output_fn(prediction, accept):
        return json.dumps({"rows": prediction.squeeze(1).tolist()})
''')


def batched_client(model_dir: Path, name: str, **settings: object) -> TestClient:
    options = {"model_dir": model_dir, "handler_batching": True, "request_timeout_s": 20.0, **settings}
    loader = lambda: HandlerModel.load(model_dir, module_name=name, batching=True)
    return TestClient(create_app(Settings(**options), loader), raise_server_exceptions=False)


def behind_a_held_call(client: TestClient, functions: dict, bodies: list[object], monkeypatch) -> list:
    """Answers to ``bodies``: the first holds predict_fn (until every other is queued behind it),
    so the rest share the next call."""
    submitted: list[int] = []
    submit = Batcher.submit

    async def counted(self, inputs, images=1):
        submitted.append(len(inputs))  # in the queue by the time this coroutine next yields
        return await submit(self, inputs, images)

    monkeypatch.setattr(Batcher, "submit", counted)
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        first = pool.submit(post, client, bodies[0])
        assert functions["STARTED"].wait(10)
        rest = [pool.submit(post, client, body) for body in bodies[1:]]
        deadline = time.monotonic() + 10
        while len(submitted) < len(bodies):  # every request waits behind the first call
            assert time.monotonic() < deadline, submitted
            time.sleep(0.01)
        functions["RELEASE"].set()
        return [future.result(timeout=30) for future in (first, *rest)]


def test_batched_handlers_share_predict_fn_calls_and_answer_each_request_its_own_rows(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    model_dir = model_folder(tmp_path / "model", BATCHED_PY)
    with batched_client(model_dir, "inference_batched") as client:
        wait_for(client, "ready")
        functions = client.app.state.service.model().predictor.functions["predict_fn"].__globals__
        requests = [[[1, 1, 1]], [[1, 0, 0], [0, 1, 0]], [[0, 0, 3]], [[2, 2, 2], [1, 2, 3], [0, 0, 0]]]
        answers = behind_a_held_call(client, functions, [{"inputs": rows} for rows in requests], monkeypatch)
    for rows, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"rows": [2.0 * sum(row) for row in rows]}
    assert "batch of 6" in answers[1].headers["server-timing"]
    # The three requests that queued shared one call of six rows; no call saw request headers.
    assert [rows for rows, _ in functions["CALLS"]] == [1, 6]
    assert all(headers == {} for _, headers in functions["CALLS"])


def test_a_shared_call_that_fails_fails_only_the_request_that_broke_it(tmp_path: Path, monkeypatch) -> None:
    model_dir = model_folder(tmp_path / "model", BATCHED_PY)
    with batched_client(model_dir, "inference_batched_isolated") as client:
        wait_for(client, "ready")
        functions = client.app.state.service.model().predictor.functions["predict_fn"].__globals__
        bodies = [{"inputs": [[1, 1, 1]]}, {"inputs": [[1, 0, 0]]}, {"inputs": [[9, 9, 9], [1, 1, 1]]},
                  {"inputs": [[0, 0, 2]]}]  # the third makes predict_fn drop a row: its call fails
        first, good, bad, other = behind_a_held_call(client, functions, bodies, monkeypatch)
    assert (first.json(), good.json(), other.json()) == ({"rows": [6.0]}, {"rows": [2.0]}, {"rows": [4.0]})
    assert bad.status_code == 500 and "one row per input row" in bad.json()["error"]["message"]
    # The shared call of four rows failed; then each request ran alone (in the order they queued).
    calls = [rows for rows, _ in functions["CALLS"]]
    assert calls[:2] == [1, 4] and sorted(calls[2:]) == [1, 1, 2]


# predict_fn returns a structure, (scores, features), as many do: each part is cut per request.
TUPLE_PY = BATCHED_PY.replace("""    return output[:1] if (data == 9).all(dim=1).any() else output
""", """    return output, data * 10
""").replace("""    return json.dumps({"rows": prediction.squeeze(1).tolist()})
""", """    scores, features = prediction
    return json.dumps({"rows": scores.squeeze(1).tolist(), "features": features.tolist()})
""")
assert TUPLE_PY.count("features") == 3


def test_a_predict_fn_returning_a_tuple_gives_each_request_its_own_part_of_each(tmp_path: Path, monkeypatch) -> None:
    model_dir = model_folder(tmp_path / "model", TUPLE_PY)
    with batched_client(model_dir, "inference_batched_tuple") as client:
        wait_for(client, "ready")
        functions = client.app.state.service.model().predictor.functions["predict_fn"].__globals__
        requests = [[[1, 1, 1]], [[1, 2, 0]], [[0, 0, 1], [3, 0, 0]]]
        answers = behind_a_held_call(client, functions, [{"inputs": rows} for rows in requests], monkeypatch)
    for rows, answer in zip(requests, answers, strict=True):
        assert answer.json() == {"rows": [2.0 * sum(row) for row in rows],
                                 "features": [[10.0 * value for value in row] for row in rows]}
    assert [rows for rows, _ in functions["CALLS"]] == [1, 3]


def test_batched_handlers_name_what_input_fn_or_predict_fn_must_return(tmp_path: Path) -> None:
    model_dir = model_folder(tmp_path / "model", BATCHED_PY)
    with batched_client(model_dir, "inference_batched_errors") as client:
        wait_for(client, "ready")
        client.app.state.service.model().predictor.functions["predict_fn"].__globals__["RELEASE"].set()
        not_rows = post(client, {"shape_only": True})
        assert not_rows.status_code == 500 and not_rows.json()["error"]["code"] == "handler_error"
        assert "input_fn must return a tensor or array" in not_rows.json()["error"]["message"]
        short = post(client, {"inputs": [[9, 9, 9], [1, 1, 1]]})  # predict_fn drops a row
        assert short.status_code == 500
        assert "one row per input row" in short.json()["error"]["message"]
        assert client.get("/ping").status_code == 200
        assert post(client, {"inputs": [[1, 1, 1]]}).json() == {"rows": [6.0]}


def test_batched_handlers_refuse_transform_fn_at_load(tmp_path: Path) -> None:
    model_dir = model_folder(tmp_path / "model", "def transform_fn(model, body, content_type, accept):\n"
                                                 "    return body\n")
    with batched_client(model_dir, "inference_batched_transform") as client:
        assert "transform_fn handles a whole request in one call" in wait_for(client, "failed")["reason"]


# A model whose code imports a helper module of the same name as another model's.
OWN_HELPER_PY = textwrap.dedent('''
    import json
    import helper

    def model_fn(model_dir):
        return helper.FACTOR

    def input_fn(body, content_type):
        return json.loads(body)

    def predict_fn(data, model):
        return [value * model for value in data]
''')


def test_multi_model_mode_serves_each_model_through_its_own_code(tmp_path: Path) -> None:
    from serve import server as entry

    for name, factor in (("double", 2), ("triple", 3)):
        model_folder(tmp_path / name, OWN_HELPER_PY, **{"helper.py": f"FACTOR = {factor}\n"})
    (tmp_path / "empty").mkdir()
    settings = Settings(multi_model=True, models_root=tmp_path)
    app = create_app(settings, load_model=functools.partial(entry.load_model, settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        for name in ("double", "triple"):
            loaded = client.post("/models", json={"model_name": name, "url": str(tmp_path / name)})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["handlers"] == "code/inference.py"
        for name, expected in (("double", [2, 4]), ("triple", [3, 6])):
            answer = client.post(f"/models/{name}/invoke", content=b"[1, 2]",
                                 headers={"Content-Type": "application/json"})
            assert (answer.status_code, answer.json()) == (200, expected)
        assert client.post("/invocations", content=b"[5]", headers={
            "Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": "triple"}).json() == [15]
        refused = client.post("/models", json={"model_name": "empty", "url": str(tmp_path / "empty")})
        assert refused.status_code == 400 and "no code/inference.py" in refused.json()["error"]["message"]
        assert client.delete("/models/double").status_code == 200
        assert client.post("/models/double/invoke", content=b"[1]",
                           headers={"Content-Type": "application/json"}).status_code == 404
    assert "helper" not in sys.modules  # each model's modules stay its own


def test_a_multi_model_handler_model_unpickles_its_own_classes_and_is_charged_its_files(tmp_path: Path) -> None:
    """model_fn may torch.load a whole pickled model whose class lives in code/; a model that is
    not a torch module is charged what its files take. A namespace package stays private too."""
    from serve import server as entry

    folder = tmp_path / "pickled"
    (folder / "code" / "parts").mkdir(parents=True)  # a namespace package: no __init__.py
    (folder / "code" / "parts" / "scale.py").write_text("FACTOR = 4\n")
    (folder / "code" / "net.py").write_text("class Scaler:\n    def __init__(self, factor):\n"
                                            "        self.factor = factor\n")
    (folder / "code" / "inference.py").write_text(textwrap.dedent('''
        import json, os, pickle
        from parts.scale import FACTOR

        def model_fn(model_dir):
            with open(os.path.join(model_dir, "model.pkl"), "rb") as file:
                return pickle.load(file)  # needs net.Scaler importable

        def input_fn(body, content_type):
            return json.loads(body)

        def predict_fn(data, model):
            return [value * model.factor * FACTOR for value in data]
    '''))
    sys.path.insert(0, str(folder / "code"))
    try:
        import net

        (folder / "model.pkl").write_bytes(pickle.dumps(net.Scaler(2)))
    finally:
        sys.path.remove(str(folder / "code"))
        sys.modules.pop("net", None)
    (folder / "padding.bin").write_bytes(bytes(3_000_000))
    settings = Settings(multi_model=True, models_root=tmp_path)
    app = create_app(settings, load_model=functools.partial(entry.load_model, settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        loaded = client.post("/models", json={"model_name": "pickled", "url": str(folder)})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["memoryBytes"] >= 3_000_000
        answer = client.post("/models/pickled/invoke", content=b"[1]", headers={"Content-Type": "application/json"})
        assert answer.json() == [8]
    assert not {"net", "parts", "parts.scale"} & set(sys.modules)


def test_batched_rows_keep_their_kind_and_must_be_numeric(tmp_path: Path) -> None:
    module = types.ModuleType("inference_rows")
    module.model_fn = lambda model_dir: None
    model = HandlerModel(module, tmp_path, batching=True)
    array = np.ones((2, 3), dtype=np.float32)
    assert model.batch_rows(array) is array  # predict_fn sees arrays as arrays, batched or not
    with pytest.raises(handlers.HandlerError, match="numeric rows; it returned an array of <U1"):
        model.batch_rows(np.array(["a"]))
    with pytest.raises(handlers.HandlerError, match="it returned a 0-d tensor or array"):
        model.batch_rows(torch.tensor(1.0))


def test_the_handlers_may_sit_at_the_model_root_as_sdk_v3_mounts_them(tmp_path: Path) -> None:
    """SDK v3's MMS path mounts <model>/code as the model folder; code/ wins when both exist."""
    root = tmp_path / "model"
    root.mkdir()
    (root / "inference.py").write_text("def model_fn(model_dir):\n    return 'root'\n\n"
                                       "def transform_fn(model, body, content_type, accept):\n    return model\n")
    submitted = f"file://{root / 'code'}"  # what the platform says; absent in that layout
    assert handlers.has_handlers(root, None, submitted) and handlers.code_folder(root, None, submitted) == root
    model = HandlerModel.load(root, submit_directory=submitted, module_name="inference_at_root")
    assert model.invoke(b"x", "application/octet-stream", None)[0] == b"root"
    model_folder(tmp_path / "both", "def model_fn(model_dir):\n    return 'code'\n")
    (tmp_path / "both" / "inference.py").write_text("raise RuntimeError('not this one')\n")
    assert handlers.code_folder(tmp_path / "both", None, None) == tmp_path / "both" / "code"
    constant_artifact(tmp_path / "artifact", ("cat", "dog"), "dog")  # an artifact with a stray inference.py
    (tmp_path / "artifact" / "inference.py").write_text("raise RuntimeError('not this one')\n")
    assert not handlers.has_handlers(tmp_path / "artifact", None, None)


@pytest.mark.parametrize(("environ", "expected"), [
    ({"SAGEMAKER_REGION": "eu-west-1"}, "eu-west-1"),
    ({"SAGEMAKER_REGION": "eu-west-1", "AWS_REGION": "us-east-2"}, None),
    ({"SAGEMAKER_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}, "us-east-2"),
    ({"SAGEMAKER_REGION": ""}, None),
])
def test_sagemakers_region_becomes_boto3s_default_unless_one_is_set(environ: dict, expected: str | None) -> None:
    from serve import server as entry

    entry.default_region(Settings.from_env(environ), environ)
    assert environ.get("AWS_DEFAULT_REGION") == expected


def test_empty_sagemaker_program_and_submit_directory_mean_unset() -> None:
    """SDK v3's InferenceSpec path sends both empty."""
    settings = Settings.from_env({"SAGEMAKER_PROGRAM": "", "SAGEMAKER_SUBMIT_DIRECTORY": ""})
    assert settings.program is None and settings.submit_directory is None
