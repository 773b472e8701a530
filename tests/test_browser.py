"""The landing notebook as a user meets it: JupyterLab in headless Chromium, every cell run, the widgets and curves rendered."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent/'artifacts'
# Every wait polls for a state (server up, kernel idle, all cells run, widgets drawn); this limit only stops a hung browser
# or server, it is not a speed requirement (the quickstart trains for about a minute on an idle CPU, far longer on a busy one).
HANG_GUARD = 1800     # seconds

CHROME_FLAGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic', '--window-size=1400,1000']

def _browser_or_skip():
    "Debian's chromium and chromedriver, or skip saying why"
    chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (`make browser-deps` installs them with apt-get as root or "
                    "with passwordless sudo); the browser test needs them")
    pytest.importorskip('selenium', reason="selenium is not installed (it is in the kit's dev dependencies)")
    return chromium, driver

def _free_port()->int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _start_lab(root:Path, tmp:Path, port:int, token:str)->subprocess.Popen:
    "JupyterLab on loopback serving `root`, with its config, runtime, data and settings folders under `tmp`"
    env = {k: v for k, v in os.environ.items() if not k.startswith(('CIFAR_KIT_', 'JUPYTER_'))}
    for name in ('config', 'runtime', 'data', 'ipython'): (tmp/name).mkdir()
    env.update(JUPYTER_CONFIG_DIR=str(tmp/'config'), JUPYTER_RUNTIME_DIR=str(tmp/'runtime'), JUPYTER_DATA_DIR=str(tmp/'data'),
               IPYTHONDIR=str(tmp/'ipython'), JUPYTER_PLATFORM_DIRS='1')
    settings = tmp/'settings'/'@jupyterlab'/'notebook-extension'
    settings.mkdir(parents=True)
    (settings/'tracker.jupyterlab-settings').write_text(json.dumps({'windowingMode': 'none'}))   # every cell in the DOM
    news = tmp/'settings'/'@jupyterlab'/'apputils-extension'
    news.mkdir(parents=True)
    (news/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false'}))    # no news toast over the screenshot
    jupyter = Path(sys.executable).parent/'jupyter'
    cmd = [str(jupyter) if jupyter.exists() else 'jupyter', 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--LabApp.expose_app_in_browser=True',
           '--LabApp.news_url=None', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
           f'--LabApp.user_settings_dir={tmp/"settings"}', f'--LabApp.workspaces_dir={tmp/"workspaces"}']
    log = open(tmp/'lab.log', 'w')
    lab = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}/api/status?token={token}'
    t0 = time.monotonic()
    while time.monotonic() - t0 < HANG_GUARD:
        if lab.poll() is not None: raise RuntimeError(f"jupyter lab exited: {(tmp/'lab.log').read_text()[-2000:]}")
        try: urllib.request.urlopen(url, timeout=10); return lab
        except OSError: time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer in {HANG_GUARD} s: {(tmp/'lab.log').read_text()[-2000:]}")

def _stop(proc:subprocess.Popen):
    "Stop `proc` and its process group (the kernel too)"
    if proc is None or proc.poll() is not None: return
    try: os.killpg(proc.pid, signal.SIGTERM); proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try: os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass

_JS_STATE = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
if (!k || !w.content || !w.content.model) return null;
const cells = w.content.model.cells; let todo = 0, errors = [];
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type !== 'code') continue;
  if (c.executionCount === null) todo++;
  for (let j = 0; j < c.outputs.length; j++) {
    const o = c.outputs.get(j).toJSON();
    if (o.output_type === 'error') errors.push(i + ': ' + o.ename + ': ' + o.evalue);
  }
}
const busy = [...document.querySelectorAll('.jp-InputPrompt')].filter(p => p.textContent.includes('[*]')).length;
return {status: k.status, todo: todo, busy: busy, errors: errors};
"""

def _wait(driver, pred, timeout:float, what:str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v: return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

def test_index_notebook_in_jupyterlab(tmp_path):
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    root = tmp_path/'nbs'; root.mkdir()
    shutil.copy(REPO/'nbs'/'index.ipynb', root/'index.ipynb')     # a copy: running the cells must not dirty the checkout
    port, token, lab, driver = _free_port(), os.urandom(12).hex(), None, None
    shot = tmp_path/'index.png'
    try:
        t0 = time.time()
        lab = _start_lab(root, tmp_path, port, token)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for f in CHROME_FLAGS + [f'--user-data-dir={tmp_path/"chrome"}']: opts.add_argument(f)
        driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
        driver.get(f'http://127.0.0.1:{port}/lab/tree/index.ipynb?token={token}')
        _wait(driver, lambda: (driver.execute_script(_JS_STATE) or {}).get('status') == 'idle', HANG_GUARD, 'the notebook and an idle kernel')
        t_open = time.time() - t0
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        def done():
            s = driver.execute_script(_JS_STATE)
            if s and s['errors']: return s
            return s if s and s['status'] == 'idle' and s['todo'] == 0 and s['busy'] == 0 else None
        state = _wait(driver, done, HANG_GUARD, 'every cell to run')
        t_run = time.time() - t0 - t_open
        def drawn():   # widget views attach after the kernel is idle: wait for them instead of sleeping a guessed time
            if state['errors']: return True
            imgs = driver.find_elements(By.CSS_SELECTOR, '.jp-RenderedImage img')
            return (driver.find_elements(By.CSS_SELECTOR, '.widget-hprogress, .widget-progress') and
                    driver.find_elements(By.CSS_SELECTOR, '.widget-dropdown select') and len(imgs) >= 2 and
                    all(driver.execute_script('return arguments[0].complete && arguments[0].naturalWidth', i) for i in imgs))
        _wait(driver, drawn, HANG_GUARD, 'the widgets and images to render')

        # a tall viewport, so that one screenshot shows the whole notebook (it scrolls inside its own panel)
        h = driver.execute_script("const n = document.querySelector('.jp-WindowedPanel-outer'); return n ? n.scrollHeight : 1000;")
        driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                               {'width': 1400, 'height': min(max(h + 250, 1000), 14000), 'deviceScaleFactor': 1, 'mobile': False})
        driver.execute_script("window.jupyterapp.shell.collapseLeft(); window.jupyterapp.shell.activeCell = null;")
        time.sleep(1)   # the two pauses only let the screenshot settle; no assertion depends on them
        driver.execute_script("const n = document.querySelector('.jp-WindowedPanel-outer'); if (n) n.scrollTop = 0;")
        time.sleep(1)
        driver.save_screenshot(str(shot))
        ARTIFACTS.mkdir(exist_ok=True); shutil.copy(shot, ARTIFACTS/'index.png')
        print(f"\nscreenshot: {shot} (and {ARTIFACTS/'index.png'}); notebook open in {t_open:.0f} s, cells ran in {t_run:.0f} s")

        assert not state['errors'], f"cells failed: {state['errors']}"
        tracebacks = [e.text[:300] for e in driver.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
                      if 'Traceback' in e.text or 'Error' in e.text]
        assert not tracebacks, f"error output: {tracebacks}"
        text = driver.find_element(By.TAG_NAME, 'body').text
        assert 'Error displaying widget' not in text and 'Error rendering output' not in text, "a widget or output failed to render"
        assert driver.find_elements(By.CSS_SELECTOR, '.widget-hprogress, .widget-progress'), "no tqdm progress widget rendered"
        assert driver.find_elements(By.CSS_SELECTOR, '.widget-dropdown select'), "no model explorer dropdown rendered"
        assert '36,479,194' in text, "the model explorer's table (WRN-28-10) did not render"
        imgs = driver.find_elements(By.CSS_SELECTOR, '.jp-RenderedImage img')
        assert len(imgs) >= 2, f"expected the live curves and curves.png, found {len(imgs)} images"
        assert all(driver.execute_script('return arguments[0].naturalWidth', i) > 100 for i in imgs), "an image did not load"
        assert 'test accuracy' in text and ('No row has a finished run yet' in text or "seed's error" in text), \
            "the quickstart's result or the benchmark table is missing"
    finally:
        if driver is not None: driver.quit()
        _stop(lab)
