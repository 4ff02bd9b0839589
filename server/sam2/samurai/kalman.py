"""Constant-velocity Kalman filter on one box: the SORT / DeepSORT / ByteTrack filter SAMURAI uses.

Reference: yangchris11/samurai, sam2/sam2/utils/kalman_filter.py (same maths, written out here).

State x = (cx, cy, a, h, vx, vy, va, vh): box centre, aspect ratio a = w / h, height h, and their
velocities per frame. Measurement z = (cx, cy, a, h). With dt = 1 frame:

    F = [[I4, dt*I4],      H = [I4, 0]
         [0,  I4   ]]

    initiate(z):  x = (z, 0, 0, 0, 0)     P = diag(std0 ** 2)
    predict:      x = F x                 P = F P F^T + Q
    project:      z_hat = H x             S = H P H^T + R
    update(z):    K = P H^T S^-1          x = x + K (z - z_hat)       P = P - K S K^T

The noise scales with the box height h ("a bit hacky", says the original), with standard deviations
    std0 = [2h/20, 2h/20, 1e-2, 2h/20, 10h/160, 10h/160, 1e-5, 10h/160]   h = measured height
    Q    = diag([h/20, h/20, 1e-2, h/20, h/160, h/160, 1e-5, h/160] ** 2)  h = mean[3] before predicting
    R    = diag([h/20, h/20, 1e-1, h/20] ** 2)                            h = mean[3] of the state updated
(the aspect ratio gets fixed small deviations). S^-1 is never formed: K comes from a Cholesky solve.
"""

from __future__ import annotations

import numpy as np

STD_WEIGHT_POSITION = 1.0 / 20
STD_WEIGHT_VELOCITY = 1.0 / 160


class KalmanFilter:
    """Stateless maths; the caller owns (mean [8], covariance [8, 8])."""

    def __init__(self, dt: float = 1.0) -> None:
        self.motion_mat = np.eye(8)
        self.motion_mat[:4, 4:] = dt * np.eye(4)  # F: position += dt * velocity
        self.update_mat = np.eye(4, 8)  # H: we observe the first four state entries

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A new track at measurement (cx, cy, a, h), with zero velocity."""
        z = np.asarray(measurement, dtype=np.float64)
        h = z[3]
        mean = np.concatenate([z, np.zeros(4)])
        pos, vel = 2 * STD_WEIGHT_POSITION * h, 10 * STD_WEIGHT_VELOCITY * h
        std = np.array([pos, pos, 1e-2, pos, vel, vel, 1e-5, vel])
        return mean, np.diag(std**2)

    @staticmethod
    def process_noise(h: float) -> np.ndarray:
        """Q, for a state of height h."""
        pos, vel = STD_WEIGHT_POSITION * h, STD_WEIGHT_VELOCITY * h
        return np.diag(np.array([pos, pos, 1e-2, pos, vel, vel, 1e-5, vel]) ** 2)

    @staticmethod
    def measurement_noise(h: float) -> np.ndarray:
        """R, for a state of height h."""
        pos = STD_WEIGHT_POSITION * h
        return np.diag(np.array([pos, pos, 1e-1, pos]) ** 2)

    def predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame ahead: x = F x, P = F P F^T + Q(h of the state before the step)."""
        q = self.process_noise(mean[3])
        f = self.motion_mat
        return f @ mean, f @ covariance @ f.T + q

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The state in measurement space: z_hat = H x, S = H P H^T + R(h of this state)."""
        h_mat = self.update_mat
        return h_mat @ mean, h_mat @ covariance @ h_mat.T + self.measurement_noise(mean[3])

    def update(
        self, mean: np.ndarray, covariance: np.ndarray, measurement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Correct the (predicted) state with a measured box (cx, cy, a, h)."""
        projected_mean, s = self.project(mean, covariance)
        # K = P H^T S^-1, i.e. S K^T = (P H^T)^T; with S = L L^T solve L Y = (P H^T)^T, then L^T K^T = Y.
        chol = np.linalg.cholesky(s)
        pht = covariance @ self.update_mat.T
        gain = np.linalg.solve(chol.T, np.linalg.solve(chol, pht.T)).T
        innovation = np.asarray(measurement, dtype=np.float64) - projected_mean
        return mean + gain @ innovation, covariance - gain @ s @ gain.T
