#!/usr/bin/env python
"""Take the README's screenshot of ``diffusers-cir serve``: the picture world's page with a query and its results.

    python scripts/screenshot_serve.py docs/serve.png [--world default] [--text "make it blue"]

Starts the page in this process, drives Debian's headless Chromium with selenium (``apt-get install chromium
chromium-driver``; ``pip install selenium``), uploads a test query's reference picture, types its text, searches, and
saves a palette PNG of the page.
"""

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--world", default="default", choices=["default", "tiny"])
    parser.add_argument("--query", type=int, default=7, help="Which test query of the world to show.")
    parser.add_argument("--size", default="1280,960", help="Browser window WIDTH,HEIGHT.")
    args = parser.parse_args(argv)

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from diffusers_cir import load_image
    from diffusers_cir.demo import build_picture_world
    from diffusers_cir.demo.serve import build_app, picture_world_backend

    work = Path(tempfile.mkdtemp(prefix="diffusers-cir-screenshot-"))
    backend = picture_world_backend(args.world, work_dir=work)
    world = build_picture_world(args.world)
    test = world.triplets("test")
    reference = Path(backend.examples[0]).parent / f"{world.gallery_ids[int(test.reference_indices[args.query])]}.png"
    text = test.modification_texts[args.query]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(backend)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                       quiet=True, footer_links=[])
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*FLAGS, f"--window-size={args.size}", f"--user-data-dir={work / 'browser'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#reference input[type=file]")).send_keys(str(reference))
        wait.until(lambda d: reference.stem in d.find_element(By.CSS_SELECTOR, "#reference-note").text)
        driver.find_element(By.CSS_SELECTOR, "#text textarea").send_keys(text)
        driver.find_element(By.CSS_SELECTOR, "#search").click()
        wait.until(lambda d: "picture-" in d.find_element(By.CSS_SELECTOR, "#ranking").text)
        time.sleep(2)  # the result thumbnails load after the table
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        raw = work / "raw.png"
        driver.save_screenshot(str(raw))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        load_image(raw).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    finally:
        driver.quit()
        app.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.output}: {text!r} on {reference.name}, {args.output.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
