"The modern track: every CIFAR row of the seed has a `-modern` twin (same model, data, epochs) whose options are run settings."
import dataclasses
import pytest
from cifar_kit.recipes import RECIPES, get_recipe, validate_recipe
from cifar_kit.reproduction.driver import benchmark_rows
from cifar_kit.config import TrainConfig, config_from

OPTION_FIELDS = {'aa', 'reprob', 'cutout', 'mixup', 'cutmix', 'mixup_switch_prob', 'label_smoothing', 'nesterov',
                 'mixup_prob', 'opt_no_wd_1d', 'model_ema', 'model_ema_decay', 'clip_grad', 'tta', 'schedule'}   # the training options a modern recipe may set
CIFAR_ROWS = [k for k in benchmark_rows() if RECIPES[k].dataset in ('cifar10', 'cifar100')]
MODERN = [k for k, r in RECIPES.items() if r.track == 'modern']

def test_every_cifar_row_has_a_modern_twin():
    assert len(CIFAR_ROWS) == 24
    for k in CIFAR_ROWS:
        m, r = get_recipe(f'{k}-modern'), RECIPES[k]
        assert (m.arch, m.dataset, m.epochs, m.model_kwargs, m.faithful) == (r.arch, r.dataset, r.epochs, r.model_kwargs, k)
        assert m.options and m.source and r.options == {} and r.track == 'faithful'
    assert sorted(MODERN) == sorted([f'{k}-modern' for k in CIFAR_ROWS] + ['resnet20-digits-modern'])

def test_modern_rows_are_not_benchmark_rows():
    "The table has one row per seed row; the modern run is a column of it"
    assert not set(MODERN) & set(benchmark_rows())

def test_digits_twin_keeps_the_epochs():
    m, r = RECIPES['resnet20-digits-modern'], RECIPES['resnet20-digits']
    assert (m.arch, m.dataset, m.epochs, m.milestones) == (r.arch, r.dataset, r.epochs, r.milestones)

def test_anchors_are_cited():
    "A published error only where a paper trained this very model with these options, and then with its source"
    anchored = {k: RECIPES[k].anchor_err for k in MODERN if RECIPES[k].anchor_err is not None}
    assert anchored == {'wrn28_10-c10-modern': 2.6, 'wrn28_10-c100-modern': 17.1,
                        'densenet_bc_190_40-c10-modern': 2.7, 'densenet_bc_190_40-c100-modern': 16.8}
    assert 'AutoAugment' in RECIPES['wrn28_10-c10-modern'].source and 'mixup' in RECIPES['densenet_bc_190_40-c100-modern'].source

def test_options_are_known_training_options():
    for k in MODERN: assert set(RECIPES[k].options) <= OPTION_FIELDS, k

def test_every_option_is_a_trainconfig_field():
    "Passes once the training options are fields of TrainConfig"
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert OPTION_FIELDS <= fields, sorted(OPTION_FIELDS - fields)

@pytest.mark.parametrize('row', ['wrn28_10-c10-modern', 'resnet20-digits-modern', 'densenet_bc_190_40-c100-modern'])
def test_config_from_merges_the_options(row):
    r = RECIPES[row]
    c = config_from(row)
    assert all(getattr(c, k) == v for k, v in r.options.items()) and (c.arch, c.epochs, c.recipe) == (r.arch, r.epochs, row)
    flag = {'label_smoothing': 0.3}   # a flag given wins over the recipe's option
    assert config_from(row, **flag).label_smoothing == 0.3

def test_faithful_configs_unchanged():
    c = config_from('wrn28_10-c10')
    assert c.options == {} and c.schedule == 'multistep' and c.label_smoothing == 0.0

def test_a_twin_must_keep_its_rows_budget():
    bad = dataclasses.replace(RECIPES['resnet20-digits-modern'], epochs=20, milestones=(8, 11))
    with pytest.raises(ValueError, match='keeps the model, data and epochs'): validate_recipe(bad)

def test_a_record_that_drops_an_option_drifts_from_its_recipe():
    from cifar_kit.reproduction.audit import recipe_drift
    row = 'wrn28_10-c10-modern'
    r = RECIPES[row]
    config = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)} | r.options
    assert recipe_drift({'config': config, 'epochs': r.epochs}, row) == []
    drift = recipe_drift({'config': config | {'aa': 'trivialaugment', 'schedule': 'multistep'}, 'epochs': r.epochs}, row)
    assert any(d.startswith("aa 'trivialaugment'") for d in drift) and any(d.startswith("schedule 'multistep'") for d in drift)

def test_committed_tracks_are_what_the_builder_makes(tmp_path):
    "reproductions/TRACKS.md is the tracks table built from the committed records"
    from pathlib import Path
    from cifar_kit.reproduction.table import build_table
    root = Path(__file__).resolve().parents[1]
    build_table(root / 'reproductions' / 'runs', tmp_path, allow_empty=True)
    assert (tmp_path / 'TRACKS.md').read_text() == (root / 'reproductions' / 'TRACKS.md').read_text(), 'rerun `cifar-kit table`'
