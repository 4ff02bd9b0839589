"""SAMURAI's Kalman filter (server/sam2/samurai/kalman.py): closed-form steps and a constant
velocity learnt; pure numpy, hand-computed expectations.

Reference behaviour: yangchris11/samurai, sam2/sam2/utils/kalman_filter.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.sam2.samurai import KalmanFilter, xyxy_to_xyah


def test_kalman_initiate_predict_update_closed_form():
    kf = KalmanFilter()
    # Box [10, 20, 50, 100] -> z = (30, 60, 0.5, 80); h = 80.
    mean, cov = kf.initiate(xyxy_to_xyah(np.array([10, 20, 50, 100])))
    assert mean.tolist() == [30, 60, 0.5, 80, 0, 0, 0, 0]
    # std0: position 2/20 * 80 = 8 -> 64; aspect 1e-2 -> 1e-4; velocity 10/160 * 80 = 5 -> 25; va 1e-5 -> 1e-10.
    assert np.allclose(np.diag(cov), [64, 64, 1e-4, 64, 25, 25, 1e-10, 25], rtol=0, atol=1e-15)
    assert np.count_nonzero(cov - np.diag(np.diag(cov))) == 0

    mean, cov = kf.predict(mean, cov)
    # Zero velocity: same position. P' = F P F^T + Q with Q from h = 80:
    # Q: (80/20)^2 = 16 for x, y, h; (1e-2)^2 = 1e-4 for a; (80/160)^2 = 0.25 for vx, vy, vh; 1e-10 for va.
    # P'_xx = P_xx + 2 P_xv + P_vv + Q_x = 64 + 0 + 25 + 16 = 105;  P'_x,vx = P_xv + P_vv = 25;
    # P'_vv = 25 + 0.25 = 25.25;  P'_aa = 1e-4 + 1e-10 + 1e-4;  P'_a,va = 1e-10;  P'_vava = 2e-10.
    assert mean.tolist() == [30, 60, 0.5, 80, 0, 0, 0, 0]
    assert cov[0, 0] == pytest.approx(105) and cov[1, 1] == pytest.approx(105) and cov[3, 3] == pytest.approx(105)
    assert cov[0, 4] == pytest.approx(25) and cov[4, 0] == pytest.approx(25) and cov[3, 7] == pytest.approx(25)
    assert cov[4, 4] == pytest.approx(25.25) and cov[7, 7] == pytest.approx(25.25)
    assert cov[2, 2] == pytest.approx(2e-4 + 1e-10, rel=1e-12) and cov[2, 6] == pytest.approx(1e-10)
    assert cov[6, 6] == pytest.approx(2e-10)
    assert cov[0, 1] == 0 and cov[0, 5] == 0

    # Measure x = 41 (11 px right of the prediction). R_x = (80/20)^2 = 16, S_xx = 105 + 16 = 121.
    # K_x = 105/121, K_vx = 25/121 -> x = 30 + 11 * 105/121 = 39.5454..., vx = 11 * 25/121 = 2.2727...
    # P_xx = 105 - 105^2/121 = 105 * 16/121;  P_vv = 25.25 - 25^2/121;  P_xv = 25 - 105*25/121 = 25 * 16/121.
    new_mean, new_cov = kf.update(mean, cov, np.array([41.0, 60.0, 0.5, 80.0]))
    assert new_mean[0] == pytest.approx(30 + 11 * 105 / 121)
    assert new_mean[4] == pytest.approx(11 * 25 / 121)
    assert new_mean[[1, 2, 3, 5, 6, 7]].tolist() == pytest.approx([60, 0.5, 80, 0, 0, 0])
    assert new_cov[0, 0] == pytest.approx(105 * 16 / 121)
    assert new_cov[4, 4] == pytest.approx(25.25 - 25**2 / 121)
    assert new_cov[0, 4] == pytest.approx(25 * 16 / 121)
    assert np.allclose(new_cov, new_cov.T)


def test_kalman_noise_uses_the_state_height():
    kf = KalmanFilter()
    mean, _ = kf.initiate(np.array([0.0, 0.0, 1.0, 40.0]))
    mean[3] = 200.0  # the noise follows mean[3], not the initial measurement
    _, predicted = kf.predict(mean, np.zeros((8, 8)))
    # Q_x = (200/20)^2 = 100, Q_vx = (200/160)^2 = 1.5625.
    assert predicted[0, 0] == pytest.approx(100) and predicted[4, 4] == pytest.approx(1.5625)
    _, s = kf.project(mean, np.zeros((8, 8)))
    # R = diag(10^2, 10^2, 0.1^2, 10^2).
    assert np.diag(s).tolist() == pytest.approx([100, 100, 0.01, 100])


def test_kalman_learns_a_constant_velocity_and_leads_the_box():
    kf = KalmanFilter()
    box = np.array([100.0, 50.0, 150.0, 150.0])  # w 50, h 100
    mean, cov = kf.initiate(xyxy_to_xyah(box))
    for k in range(1, 101):
        mean, cov = kf.predict(mean, cov)
        mean, cov = kf.update(mean, cov, xyxy_to_xyah(box + [5 * k, 0, 5 * k, 0]))
    assert mean[4] == pytest.approx(5.0, abs=1e-3)  # vx -> 5 px / frame
    assert mean[5] == pytest.approx(0.0, abs=1e-9) and mean[7] == pytest.approx(0.0, abs=1e-9)
    last_cx = 125.0 + 5 * 100
    assert mean[0] == pytest.approx(last_cx, abs=1e-2)
    predicted, _ = kf.predict(mean, cov)
    assert predicted[0] == pytest.approx(last_cx + 5.0, abs=1e-2)  # leads the box by one step
