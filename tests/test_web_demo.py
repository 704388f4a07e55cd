"""The VL-Vicuna web demo: handlers on a real tiny model, the server's defaults and upload
limit, and (when Chromium is installed) the page end to end in a headless browser."""

import json
import os
import socket
import urllib.error
import urllib.request
import uuid

import pytest
import torch
from PIL import Image

from cdp_browser import HeadlessChromium, find_chromium

LIMIT_MB = 0.05  # 52,428 bytes: the small image fits, the noise image does not
QUESTION = "What do you see?"


@pytest.fixture(scope="module")
def engine(plugin, tmp_path_factory):
    from lavis_vpgtrans.chat.session import ChatEngine
    from lavis_vpgtrans.models.loading import load_chat_model

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))  # uploads land here
    torch.manual_seed(0)
    model, vis = load_chat_model("blip2_vicuna", "tiny_vl_vicuna", device="cpu")
    return ChatEngine(model, vis, max_image_mb=LIMIT_MB, max_new_tokens=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    small = d / "red.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(small)
    big = d / "noise.png"  # a real image, but ~190 KB
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(big)
    notes = d / "notes.txt"
    notes.write_text("these are notes, not a picture\n")
    fake = d / "holiday.png"
    fake.write_bytes(b"<html>an image extension is not an image</html>")
    assert small.stat().st_size < LIMIT_MB * 2**20 < big.stat().st_size
    return {"small": str(small), "big": str(big), "notes": str(notes), "fake": str(fake)}


def expected_answer(engine, path, message):
    image = engine.vis_processor(Image.open(path).convert("RGB"))
    return engine.model.chat(image, message, **engine.generation)


# --------------------------------------------------------------------------- handlers


def test_upload_handler_refuses_non_images_and_oversize_files(engine, files):
    from lavis_vpgtrans.chat.web import on_upload

    for key, name in (("notes", "notes.txt"), ("fake", "holiday.png")):
        state, preview, status, chat, box = on_upload(engine, files[key], None)
        assert state is None and preview is None and chat == [] and box is None
        assert status == f"**Error:** {name} is not an image file that can be read (JPEG, PNG, WebP, ...): " \
                         "UnidentifiedImageError"
    state, preview, status, _, _ = on_upload(engine, files["big"], None)
    assert state is None and preview is None
    assert "noise.png is 0.18" in status and "the upload limit is 0.05 MB" in status
    state, preview, status, chat, _ = on_upload(engine, files["small"], None)
    assert state.image.shape == (3, 32, 32) and state.history == [] and preview == files["small"]
    assert status == "Image **red.png** loaded. Ask a question about it."


def test_message_and_reset_handlers(engine, files):
    from lavis_vpgtrans.chat.web import on_message, on_reset, on_upload

    state, chat, box, status = on_message(engine, QUESTION, None)
    assert state is None and chat == [] and box == QUESTION and status == "**Error:** upload an image first."

    state = on_upload(engine, files["small"], None)[0]
    state, chat, box, status = on_message(engine, QUESTION, state)
    answer = expected_answer(engine, files["small"], QUESTION)
    assert chat == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    assert box == "" and not status.startswith("**Error")

    # a message the template cannot carry is refused and stays in the box; history unchanged
    state, chat, box, status = on_message(engine, "what is ### this", state)
    assert box == "what is ### this" and len(chat) == 2 and "may not contain '###'" in status

    state, chat, status = on_reset(state)
    assert chat == [] and state.history == [] and state.image is not None


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_address():
    """This machine's outward address, if it has one (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def post_file(url: str, path: str):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{os.path.basename(path)}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + open(path, "rb").read() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(engine):
    """The demo as `python -m lavis_vpgtrans.chat.web` serves it, with the default host."""
    from lavis_vpgtrans.chat.web import launch

    demo = launch(engine, port=free_port(), block=False)
    yield demo
    demo.close()


def test_server_listens_on_localhost_only_by_default(server):
    from lavis_vpgtrans.chat.web import parse_args

    assert parse_args([]).host == "127.0.0.1"
    assert server.server_name == "127.0.0.1"
    with urllib.request.urlopen(server.local_url, timeout=30) as response:
        assert response.status == 200 and b"VL-Vicuna" in response.read()
    address = non_loopback_address()
    if address is not None:  # the same port on the machine's network address is closed
        with pytest.raises(OSError):
            socket.create_connection((address, server.server_port), timeout=5).close()


def test_server_refuses_oversize_uploads_itself(server, files):
    """The limit holds on the server, not only in the browser's upload widget."""
    status, text = post_file(server.local_url + "gradio_api/upload", files["big"])
    assert status == 413 and "File size exceeded maximum allowed size of 52428 bytes" in text
    status, _ = post_file(server.local_url + "gradio_api/upload", files["small"])
    assert status == 200


# --------------------------------------------------------------------------- browser

CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium); "
                                             "the browser test of the web demo needs it")
def test_browser_upload_errors_and_a_chat_turn(server, engine, files):
    browser = HeadlessChromium(CHROMIUM)
    try:
        browser.goto(server.local_url)
        assert browser.wait_for("!!document.querySelector('#upload input[type=file]')")
        assert "Upload an image" in browser.text("#status")

        browser.set_file("#upload input[type=file]", files["notes"])
        status = browser.wait_for("document.querySelector('#status').innerText.includes('notes.txt') && "
                                  "document.querySelector('#status').innerText")
        assert status.startswith("Error: notes.txt is not an image file that can be read")

        browser.set_file("#upload input[type=file]", files["big"])
        toast = browser.wait_for("document.body.innerText.includes('exceeds the maximum allowed size') && "
                                 "document.body.innerText")
        assert "noise.png" in toast and "52428 bytes" in toast

        browser.set_file("#upload input[type=file]", files["small"])
        assert browser.wait_for("document.querySelector('#status').innerText.includes('red.png loaded')")

        browser.type_into("#message textarea", QUESTION)
        browser.click("#send")
        answer = expected_answer(engine, files["small"], QUESTION)
        shown = browser.wait_for(f"document.querySelector('#chatbot').innerText.includes({json.dumps(answer)}) && "
                                 "document.querySelector('#chatbot').innerText")
        assert shown and QUESTION in shown, browser.text("#chatbot")
    finally:
        browser.close()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL reads the size from the header alone)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_png_bomb_is_refused_as_too_many_pixels(engine, tmp_path):
    from lavis_vpgtrans.chat.web import on_upload

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    state, preview, status, _, _ = on_upload(engine, str(bomb), None)
    assert state is None and preview is None
    assert status.startswith("**Error:** bomb.png has too many pixels (the limit is 40,000,000 pixels)")


def test_uploads_are_deleted_when_the_server_stops(engine, files):
    from lavis_vpgtrans.chat.web import launch, shutdown

    demo = launch(engine, port=free_port(), block=False)
    try:
        status, text = post_file(demo.local_url + "gradio_api/upload", files["small"])
        assert status == 200
        stored = json.loads(text)[0]
        assert stored.startswith(demo.upload_dir + os.sep) and os.path.isfile(stored)
    finally:
        shutdown(demo)
    assert not os.path.exists(demo.upload_dir)
