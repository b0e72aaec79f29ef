"""trainers.correspondence: the MediaPipe-to-model correspondence is reproducible."""
import numpy as np

from engine.correspondence import LandmarkCorrespondence
from engine.facemodel import barycentric_points
from engine.gaze import IRIS_LANDMARKS
from trainers.correspondence import derive, eyeball_triangles


def test_a_smaller_derivation_lands_where_the_committed_one_does(model):
    """One identity's renders (30 of the 120) must put the landmarks where the
    committed asset has them: the asset is what the trainer makes, not hand-edited."""
    committed = LandmarkCorrespondence.load()
    small = derive(model, n_identities=1, verbose=False)
    a = barycentric_points(model.neutral, model.triangles, committed.triangle, committed.barycentric)
    b = barycentric_points(model.neutral, model.triangles, small.triangle, small.barycentric)
    d_mm = np.linalg.norm(a - b, axis=1) * 10
    assert np.median(d_mm) < 1.0
    assert np.percentile(d_mm, 90) < 3.0


def test_lid_landmarks_stay_off_the_eyeballs_and_irises_on_them(model):
    corr = LandmarkCorrespondence.load()
    on_eyeball = eyeball_triangles(model, corr.triangle)
    iris = np.isin(np.arange(len(corr.triangle)), IRIS_LANDMARKS)
    assert np.all(on_eyeball[iris]) and not np.any(on_eyeball[~iris])
