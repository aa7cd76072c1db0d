"""Every notebook in nbs/ runs top to bottom (with few epochs and images) and is stored with its outputs."""
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NBS = sorted((Path(__file__).resolve().parents[1] / 'nbs').glob('*.ipynb'))
# the parameter cells read these: 2 epochs (pruning starts with the second), 100 images
SMALL = {'FASTERAI_NB_EPOCHS': '2', 'FASTERAI_NB_IMAGES': '100'}


def test_the_notebooks_are_there():
    assert [p.name for p in NBS] == ['01_schedules.ipynb', '02_sparsify_callback.ipynb', '03_plain_pytorch.ipynb',
                                    '04_coming_from_fasterai.ipynb']


@pytest.mark.parametrize('path', NBS, ids=[p.name for p in NBS])
def test_notebook_runs(path, monkeypatch):
    for k, v in SMALL.items(): monkeypatch.setenv(k, v)  # the kernel inherits this environment
    monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')      # no spinning threads on a busy machine
    nb = nbformat.read(path, as_version=4)
    assert any('FASTERAI_NB_EPOCHS' in c.source for c in nb.cells if c.cell_type == 'code'), "no parameter cell"
    client = NotebookClient(nb, kernel_name='python3', timeout=600, resources={'metadata': {'path': str(path.parent)}})
    try: client.execute()
    except CellExecutionError as e: pytest.fail(f"{path.name}: a cell failed:\n{str(e)[-3000:]}")
    errors = [o for c in nb.cells for o in c.get('outputs', []) if o.output_type == 'error']
    assert not errors
    assert any(o.output_type == 'display_data' and 'image/png' in o.data
               for c in nb.cells for o in c.get('outputs', [])), "no plot was drawn"


@pytest.mark.parametrize('path', NBS, ids=[p.name for p in NBS])
def test_notebook_is_saved_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(c.execution_count is not None for c in code), "saved without running every cell"
    outputs = [o for c in code for o in c.get('outputs', [])]
    assert not [o for o in outputs if o.output_type == 'error']
    assert sum(o.output_type == 'display_data' for o in outputs) >= 1
