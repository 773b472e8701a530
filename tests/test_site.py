"""The course site (docs/build.py): docs/course.yml names every notebook once, formulas convert or fail loudly, and the
site `make site` built in _site/ loads nothing from the internet and works in headless Chromium: a lesson shows its
figure and its formulas, the sidebar follows the course, an API page shows a signature. The checks of the built site skip
when _site/ is not there (`make test` builds it first)."""
import functools, http.server, importlib.util, json, threading, time
from pathlib import Path
import pytest
from test_browser import CHROME_FLAGS, _browser_or_skip

REPO = Path(__file__).resolve().parent.parent
SITE = REPO/'_site'
ARTIFACTS = Path(__file__).resolve().parent/'artifacts'


@functools.cache
def builder():
    "docs/build.py as a module (docs/ is not a package)"
    spec = importlib.util.spec_from_file_location('cifar_kit_site_build', REPO/'docs'/'build.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _site_or_skip():
    if not (SITE/'index.html').is_file():
        pytest.skip("_site/ is not built: `make site` builds it (`make test` runs it before pytest)")


def test_course_names_every_notebook_once():
    p = builder().course_problems()
    assert not p['unlisted'], f"notebooks under nbs/ that docs/course.yml does not name (add each to a part): {p['unlisted']}"
    assert not p['duplicates'], f"notebooks docs/course.yml names more than once: {p['duplicates']}"
    assert not p['missing'], f"docs/course.yml names notebooks that do not exist: {p['missing']}"


def test_course_check_names_the_culprits(tmp_path):
    b = builder()
    (tmp_path/'sub').mkdir()
    for nb in ('index.ipynb', 'a.ipynb', 'sub/b.ipynb', '_private.ipynb'): (tmp_path/nb).write_text('{}')
    course = {'home': 'index.ipynb', 'lessons': [{'part': 'P', 'notebooks': [{'nb': 'a.ipynb', 'claim': 'c'}, {'nb': 'a.ipynb'}]}],
              'reference': [{'part': 'R', 'notebooks': ['gone.ipynb']}]}
    assert b.course_problems(course, tmp_path) == dict(unlisted=['sub/b.ipynb'], duplicates=['a.ipynb'], missing=['gone.ipynb'])


def test_math_converts_or_fails_naming_the_formula():
    md, errors = builder().markdown_math('Cost \\$5; `$x$` in code; $$\\frac{1}{2}$$ and $W_s x$ and $\\nosuch{y}$\n```\n$$z$$\n```\n')
    assert errors == ['$\\nosuch{y}$: latex2mathml does not know \\nosuch'], errors
    assert 'Cost $5' in md and '`$x$`' in md and '```\n$$z$$\n```' in md and md.count('<math') == 2
    assert '<span class="math"><math display="inline">' in md and '<math display="block">' in md
    assert builder().markdown_math('$\\frac{1}{$')[1][0].startswith('$\\frac{1}{$: latex2mathml cannot convert it')


def test_course_map_table():
    "The README's and the landing page's course map, from the record of docs/results/course.json"
    rec = {'lessons': [dict(nb='04_resnet.ipynb', part='Architectures', title='ResNet', claim='depth | shortcuts', result='2.5x',
                            seconds=90.0, size='full'),
                       dict(nb='data/04_augment.ipynb', part='Architectures', title='Augmentation', claim='crops', result=None,
                            seconds=30.0, size='ci'),
                       dict(nb='01_new.ipynb', part='Next', title=None, claim='', result=None, seconds=None, size=None, built=False)]}
    assert builder().course_map_table(rec).splitlines()[2:] == [
        '| Architectures | [ResNet](nbs/04_resnet.ipynb) | depth \\| shortcuts | 2.5x | 1.5 | full |',
        '|  | [Augmentation](nbs/data/04_augment.ipynb) | crops | (no result shown yet) | 0.5 | ci |',
        '| Next | 01_new (not written yet) |  | (no result shown yet) |  |  |']
    assert '](04_resnet/)' in builder().course_map_table(rec, href=lambda nb: nb.replace('.ipynb', '/'))


def test_a_partial_full_build_rewrites_only_its_lessons_rows(tmp_path):
    b, path = builder(), tmp_path/'course.json'
    row = lambda nb, result, secs: dict(nb=nb, part='P', title=nb, claim='c', result=result, numbers={}, seconds=secs,
                                        size='full' if result else None, built=result is not None)
    path.write_text(json.dumps(dict(machine={'cpu': 'old'}, size='full', lessons=[row('a.ipynb', 'A', 10.0),
                                    row('b.ipynb', 'B', 20.0)], notebooks={'a.ipynb': 10.0, 'b.ipynb': 20.0, 'r.ipynb': 5.0})))
    # this build ran b (again) and the new lesson n; the course now has a, n, b in that order; a was not run
    partial = dict(machine={'cpu': 'new'}, size='full', notebooks={'b.ipynb': 21.0, 'n.ipynb': 30.0},
                   lessons=[row('a.ipynb', None, None), row('n.ipynb', 'N', 30.0), row('b.ipynb', 'B2', 21.0)])
    assert b.update_course_json(partial, ['n.ipynb', 'b.ipynb'], path) == ['n.ipynb', 'b.ipynb']
    rec = json.loads(path.read_text())
    assert [(l['nb'], l['result'], l['seconds']) for l in rec['lessons']] == [
        ('a.ipynb', 'A', 10.0), ('n.ipynb', 'N', 30.0), ('b.ipynb', 'B2', 21.0)]
    assert rec['machine'] == {'cpu': 'old'} and rec['partial_builds'] == [dict(machine={'cpu': 'new'},
                                                                               lessons=['n.ipynb', 'b.ipynb'])]
    assert rec['notebooks'] == {'a.ipynb': 10.0, 'b.ipynb': 21.0, 'r.ipynb': 5.0, 'n.ipynb': 30.0}


def test_offline_check_flags_what_loads_and_allows_links(tmp_path):
    (tmp_path/'a').mkdir()
    (tmp_path/'a'/'index.html').write_text(
        '<a href="https://example.org">a link</a><link rel="canonical" href="https://example.org/a/">'
        '<script src="https://cdn.example.org/x.js"></script><link href="//fonts.example.org/css" rel="stylesheet">'
        '<img src="../img/ok.png"><style>.x { background: url( "https://example.org/bg.png") }</style>')
    (tmp_path/'s.css').write_text('@import url(//example.org/font.css);\n.y { background: url(data:image/png;base64,AAAA) }')
    problems = builder().offline_problems(tmp_path)
    assert len(problems) == 4 and all('example.org' in p for p in problems), problems
    assert not any('a link' in p or 'canonical' in p or 'ok.png' in p for p in problems)


def test_checkout_check_sees_what_running_the_notebooks_wrote(tmp_path):
    "make site and make docs fail when a notebook writes into the checkout: a new file, a changed file, a dirty file rewritten"
    import subprocess
    b = builder()
    git = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a], check=True, capture_output=True)
    git('init', '-q'); (tmp_path/'kept.txt').write_text('a'); (tmp_path/'dirty.txt').write_text('x')
    git('add', '.'); git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'init')
    (tmp_path/'dirty.txt').write_text('y')   # changed before the build: not the notebooks' doing
    before = b.checkout_state(tmp_path)
    assert list(before) == ['dirty.txt'] and b.checkout_changes(before, b.checkout_state(tmp_path)) == []
    (tmp_path/'dirty.txt').write_text('z'); (tmp_path/'runs').mkdir(); (tmp_path/'runs'/'log.csv').write_text('1')
    (tmp_path/'kept.txt').unlink()
    assert b.checkout_changes(before, b.checkout_state(tmp_path)) == ['dirty.txt', 'kept.txt', 'runs/log.csv']
    assert b.checkout_state(tmp_path/'..'/'nowhere') is None


def test_site_loads_nothing_from_the_internet():
    _site_or_skip()
    problems = builder().offline_problems(SITE)
    assert not problems, f"_site/ references the internet: {problems[:20]}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def test_site_in_chromium(tmp_path):
    _site_or_skip()
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    b = builder()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base, driver = f'http://127.0.0.1:{server.server_address[1]}', None
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for f in CHROME_FLAGS + [f'--user-data-dir={tmp_path/"chrome"}']: opts.add_argument(f)
        driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
        def load(path):
            driver.get(base + path)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:   # the page and its images loaded (local files: this is quick)
                if driver.execute_script("return document.readyState === 'complete' && [...document.images].every(i => i.complete)"): return
                time.sleep(0.2)
            raise AssertionError(f"{path} did not finish loading")

        # a lesson: its figures are files that load, its formulas MathML that the browser lays out
        load('/04_resnet/')
        driver.save_screenshot(str(ARTIFACTS/'site-lesson.png'))
        imgs = driver.find_elements(By.CSS_SELECTOR, 'article img')
        assert imgs, "the ResNet lesson shows no figure"
        widths = [driver.execute_script('return arguments[0].naturalWidth', i) for i in imgs]
        assert all(w > 0 for w in widths), f"a figure did not load: natural widths {widths}"
        block = driver.find_elements(By.CSS_SELECTOR, 'article math[display="block"]')
        inline = driver.find_elements(By.CSS_SELECTOR, 'article span.math > math')
        assert block and inline, f"no MathML: {len(block)} display and {len(inline)} inline formulas"
        heights = [driver.execute_script('return arguments[0].getBoundingClientRect().height', m) for m in block + inline]
        assert all(h > 0 for h in heights), f"a formula is not laid out: heights {heights}"
        text = driver.find_element(By.CSS_SELECTOR, 'article').text
        assert '$$' not in text and '\\mathcal' not in text, "raw TeX left on the page"

        # the sidebar: the lessons in course.yml's order, each under its notebook's title
        import nbformat
        course = b.load_course()
        lessons = [e['nb'] for e in b.course_entries(course) if e['section'] == 'Course' and e['part'] and (b.NBS/e['nb']).exists()]
        links = driver.execute_script("""
            const tab = document.querySelector('nav.md-nav--primary > ul > li.md-nav__item');   // the first tab: Course
            return [...tab.querySelectorAll('a.md-nav__link[href]')].map(a => [a.textContent.trim(), a.href]);""")
        pages = {f"{base}/{Path(nb).with_suffix('').as_posix()}/": nb for nb in lessons}
        shown = [(t, pages[h]) for t, h in links if h in pages]
        assert [nb for _, nb in shown] == lessons, f"sidebar order {[nb for _, nb in shown]} is not course.yml's {lessons}"
        titles = [b.notebook_title(nbformat.read(b.NBS/nb, as_version=4)) for nb in lessons]
        assert [t for t, _ in shown] == titles, f"sidebar titles {[t for t, _ in shown]}, notebooks' titles {titles}"

        # the home page carries the course map; an API page the signature of create_model
        load('/')
        driver.save_screenshot(str(ARTIFACTS/'site-home.png'))
        table = driver.find_element(By.XPATH, "//h2[@id='the-course']/following::table[1]")
        assert '04_resnet' in table.get_attribute('innerHTML') and 'Measured' in table.text
        # the search runs in the page, on the index the build wrote
        driver.find_element(By.CSS_SELECTOR, 'label.md-search__icon, .md-search__input').click()
        driver.find_element(By.CSS_SELECTOR, 'input.md-search__input').send_keys('shortcut')
        t0 = time.monotonic()
        while not driver.find_elements(By.CSS_SELECTOR, '.md-search-result__item a[href*="04_resnet"]'):
            assert time.monotonic() - t0 < 30, "searching 'shortcut' did not find the ResNet lesson"
            time.sleep(0.2)
        load('/api/cifar_kit.core/')
        heading = driver.find_element(By.ID, 'cifar_kit.core.create_model')
        driver.execute_script('arguments[0].scrollIntoView()', heading)
        driver.save_screenshot(str(ARTIFACTS/'site-api.png'))
        sig = heading.find_element(By.XPATH, 'following-sibling::div[1]').text
        assert 'create_model(' in sig and all(p in sig for p in ('name', 'num_classes', 'pretrained', '**kwargs')), sig
        assert "(or is 'timm/<a timm model>')" in driver.find_element(By.TAG_NAME, 'article').text, "a docstring's <...> taken for HTML"
    finally:
        if driver is not None: driver.quit()
        server.shutdown(); server.server_close()


def test_readme_and_landing_course_maps_are_current():
    "README.md's and nbs/index.ipynb's course maps are what docs/course.yml and the last full build's record make now"
    stale = builder().sync_course_maps(write=False)
    assert not stale, f"the course map of {stale} is stale: run `.venv/bin/python docs/build.py --sync-readme` and commit"
