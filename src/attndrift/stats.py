"""Public home of the study's statistics: ``from attndrift.stats import welch, holm, ...``.

Implemented in `attndrift.analysis.stats` (scipy/statsmodels wrappers) and
`attndrift.analysis.onset` (collapse onset); re-exported here. No torch is imported.
"""

from attndrift.analysis.onset import collapse_onset
from attndrift.analysis.stats import (
    CorrelationMatrix,
    TestResult,
    anova_oneway,
    bootstrap_ci,
    cohens_d,
    correlation_matrix,
    holm,
    mann_whitney,
    paired_t,
    permutation_corr,
    permutation_corr_test,
    welch,
)

__all__ = ["CorrelationMatrix", "TestResult", "anova_oneway", "bootstrap_ci", "cohens_d",
           "collapse_onset", "correlation_matrix", "holm", "mann_whitney", "paired_t",
           "permutation_corr", "permutation_corr_test", "welch"]
