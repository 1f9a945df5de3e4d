/* Sorted-row statistics for ERF, Gini and entropy: an optional compiled kernel for
 * probes/metrics.py (summarize, erf, gini on float32 CPU tensors outside autograd).
 *
 * For each row of float32 weights (passed as their int32 bit patterns, which order like the
 * floats for non-negative weights: see metrics._ascending_cumsum), this computes from the row
 * sorted ascending, without writing the sorted row anywhere:
 *
 *   fit[r]   = #{j : A_j <= float32(A_N * keep)}   the smallest weights that fit in the spare mass
 *   ratio[r] = (sum_j A_j) / A_N                     Gini = (N + 1) / N - 2 * ratio / N
 *   ent[r]   = -sum_j x_j log(max(x_j, FLT_MIN))     entropy in nats (optional), in double
 *
 * where A_j = x_(1) + ... + x_(j) are the ascending running sums, accumulated in double and
 * rounded to float32 at each j exactly as torch.cumsum does on the CPU, so `fit` equals what
 * torch.searchsorted(cumsum, spare, right=True) gives for the same sorted row.
 *
 * Rows are sorted GROUP at a time, one row per vector lane, by a sorting network (the
 * comparator list comes from Python): every comparator is a vector min/max over the group. The
 * running sums, counts, ratios and logarithms are vector code too. The GIL is released, so
 * several Python threads can each take a range of rows.
 *
 * GCC/Clang vector extensions only, no intrinsics; on x86-64 Linux (GCC) the kernel is compiled
 * for AVX-512, AVX2 and baseline and picked at load time. Where this file does not build,
 * metrics.py computes the same values with numpy and torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__GNUC__)
#error "_rowstats needs GCC or Clang vector extensions"
#endif

#define LANES 16
#define HALF (LANES / 2)
#define VECS 2 /* vectors per group (measured: 1, 2, 4 and 8 cost within 20 %) */
#define GROUP (LANES * VECS) /* rows per group */
#define PARTS (GROUP / HALF)
#define FLT_MIN_VEC ((vf8){FLT_MIN, FLT_MIN, FLT_MIN, FLT_MIN, FLT_MIN, FLT_MIN, FLT_MIN, FLT_MIN})
/* Lanes h * HALF .. h * HALF + HALF - 1 of a block of VECS vectors, as floats. */
#define PART(block, h) (*(const vf8 *)((const int32_t *)(block) + (h) * HALF))

typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef int32_t vi8 __attribute__((vector_size(HALF * 4)));
typedef float vf8 __attribute__((vector_size(HALF * 4)));
typedef double vd8 __attribute__((vector_size(HALF * 8)));
typedef int64_t vl8 __attribute__((vector_size(HALF * 8)));

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Natural log of positive normal doubles: u = 2^e * m with m in [sqrt(1/2), sqrt(2)), and
 * log(m) = f * P(f), f = m - 1, with P the LOG_TERMS coefficients from Python (metrics.py fits
 * them to log1p(f) / f; the error is below 1e-11). No division, no int64 -> double conversion
 * (the exponent field becomes a double through the 2^52 trick), so every step is vector code. */
#define LOG_TERMS 13
static inline __attribute__((always_inline)) vd8
vlog(vd8 u, const double *restrict coef)
{
    const vl8 mantissa = (vl8){0} + 0x000FFFFFFFFFFFFFLL, one = (vl8){0} + 0x3FF0000000000000LL;
    const vl8 magic = (vl8){0} + 0x4330000000000000LL; /* the double 2^52 */
    vl8 bits = (vl8)u;
    vd8 e = (vd8)((bits >> 52) | magic) - 4503599627370496.0 - 1023.0;
    vd8 m = (vd8)((bits & mantissa) | one); /* in [1, 2) */
    vl8 big = (vl8)(m > 1.4142135623730951); /* all ones: halve m, add one to e */
    m = (vd8)(((vl8)m & ~big) | ((vl8)(m * 0.5) & big));
    e += (vd8)(one & big);
    vd8 f = m - 1.0, poly = (vd8){0} + coef[LOG_TERMS - 1];
    for (int i = LOG_TERMS - 2; i >= 0; i--)
        poly = poly * f + coef[i];
    return e * 0.6931471805599453 + f * poly;
}

/* One group of up to GROUP rows: t holds n blocks of VECS vectors; lane l of vector g in t[k]
 * is the k-th value of row g * LANES + l. Several vectors per comparator keep the core busy
 * while each comparator waits for the one before it. */
MULTIVERSION
static void
group_stats(vi (*restrict t)[VECS], Py_ssize_t n, const int32_t *restrict ci,
            const int32_t *restrict cj, Py_ssize_t nc, float keep, int32_t *restrict fit,
            double *restrict ratio, double *restrict ent, const double *restrict coef, int m)
{
    for (Py_ssize_t c = 0; c < nc; c++) {
        Py_ssize_t i = ci[c], j = cj[c];
        for (int g = 0; g < VECS; g++) {
            vi a = t[i][g], b = t[j][g];
            vi lt = a < b; /* all ones where a < b */
            t[i][g] = (a & lt) | (b & ~lt);
            t[j][g] = (b & lt) | (a & ~lt);
        }
    }
    /* The running sums run in double, HALF lanes per vector; the PARTS vectors of a group are
     * independent chains, interleaved so that no add waits for the one before it. */
    vd8 run[PARTS], sum[PARTS], plogp[PARTS];
    vf8 total[PARTS], spare[PARTS];
    vi8 count[PARTS];
    for (int h = 0; h < PARTS; h++)
        run[h] = plogp[h] = (vd8){0};
    for (Py_ssize_t k = 0; k < n; k++) {
        for (int h = 0; h < PARTS; h++) {
            vf8 v = PART(t[k], h);
            vd8 d = __builtin_convertvector(v, vd8);
            run[h] += d;
            if (ent) { /* the weight times log of the weight clamped to FLT_MIN, as torch's path */
                vi8 low = (vi8)(v < FLT_MIN_VEC);
                vf8 u = (vf8)(((vi8)v & ~low) | ((vi8)FLT_MIN_VEC & low));
                plogp[h] += d * vlog(__builtin_convertvector(u, vd8), coef);
            }
        }
    }
    for (int h = 0; h < PARTS; h++) {
        total[h] = __builtin_convertvector(run[h], vf8);
        spare[h] = total[h] * keep;
        run[h] = sum[h] = (vd8){0};
        count[h] = (vi8){0};
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        for (int h = 0; h < PARTS; h++) {
            run[h] += __builtin_convertvector(PART(t[k], h), vd8);
            vf8 cum = __builtin_convertvector(run[h], vf8);
            count[h] -= (vi8)(cum <= spare[h]); /* true is -1 */
            sum[h] += __builtin_convertvector(cum, vd8);
        }
    }
    for (int h = 0; h < PARTS; h++) {
        vd8 r = sum[h] / __builtin_convertvector(total[h], vd8);
        for (int l = 0; l < HALF && h * HALF + l < m; l++) {
            fit[h * HALF + l] = count[h][l];
            ratio[h * HALF + l] = r[l];
            if (ent)
                ent[h * HALF + l] = -plogp[h][l];
        }
    }
}

static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (view->itemsize != itemsize || view->len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected items of %zd bytes", name, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(row_stats_doc,
"row_stats(bits, n, ci, cj, keep, fit, ratio, ent=None, coef=None)\n\n"
"bits: C-contiguous int32 [rows * n] (float32 bit patterns); ci, cj: int32 comparator pairs of a\n"
"sorting network for n inputs; keep: the spare fraction; fit: int32 [rows], ratio and ent:\n"
"float64 [rows], written (ent only if given, with coef: the 13 float64 coefficients of\n"
"log1p(f) / f). Releases the GIL.");

static PyObject *
row_stats(PyObject *self, PyObject *args)
{
    PyObject *o_bits, *o_ci, *o_cj, *o_fit, *o_ratio, *o_ent = Py_None, *o_coef = Py_None;
    Py_ssize_t n;
    float keep;
    if (!PyArg_ParseTuple(args, "OnOOfOO|OO", &o_bits, &n, &o_ci, &o_cj, &keep, &o_fit, &o_ratio,
                          &o_ent, &o_coef))
        return NULL;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "n must be at least 1");
        return NULL;
    }
    Py_buffer bits, ci, cj, fit, ratio, ent = {0}, coef = {0};
    if (get_buffer(o_bits, &bits, 0, 4, "bits") < 0)
        return NULL;
    if (get_buffer(o_ci, &ci, 0, 4, "ci") < 0)
        goto fail_ci;
    if (get_buffer(o_cj, &cj, 0, 4, "cj") < 0)
        goto fail_cj;
    if (get_buffer(o_fit, &fit, 1, 4, "fit") < 0)
        goto fail_fit;
    if (get_buffer(o_ratio, &ratio, 1, 8, "ratio") < 0)
        goto fail_ratio;
    if (o_ent != Py_None && get_buffer(o_ent, &ent, 1, 8, "ent") < 0)
        goto fail_ent;
    if (o_coef != Py_None && get_buffer(o_coef, &coef, 0, 8, "coef") < 0)
        goto fail_coef;

    Py_ssize_t rows = bits.len / 4 / n, nc = ci.len / 4;
    const int32_t *pi = ci.buf, *pj = cj.buf;
    int bad = bits.len / 4 != rows * n || cj.len != ci.len || fit.len / 4 != rows
              || ratio.len / 8 != rows || (ent.buf && ent.len / 8 != rows)
              || (ent.buf && coef.len != 8 * LOG_TERMS);
    for (Py_ssize_t c = 0; c < nc && !bad; c++)
        bad = pi[c] < 0 || pj[c] < 0 || pi[c] >= n || pj[c] >= n;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "row_stats: inconsistent sizes or comparator indices");
        goto fail;
    }
    vi(*t)[VECS] = NULL;
    if (posix_memalign((void **)&t, 64, (size_t)n * sizeof *t) != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    const int32_t *x = bits.buf;
    int32_t *pf = fit.buf;
    double *pr = ratio.buf, *pe = ent.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t base = 0; base < rows; base += GROUP) {
        int m = rows - base < GROUP ? (int)(rows - base) : GROUP;
        for (int l = 0; l < GROUP; l++) {
            const int32_t *row = x + (base + (l < m ? l : 0)) * n; /* spare lanes repeat row 0 */
            for (Py_ssize_t k = 0; k < n; k++)
                t[k][l / LANES][l % LANES] = row[k];
        }
        group_stats(t, n, pi, pj, nc, keep, pf + base, pr + base, pe ? pe + base : NULL,
                    coef.buf, m);
    }
    Py_END_ALLOW_THREADS
    free(t);
    if (coef.buf)
        PyBuffer_Release(&coef);
    if (ent.buf)
        PyBuffer_Release(&ent);
    PyBuffer_Release(&ratio);
    PyBuffer_Release(&fit);
    PyBuffer_Release(&cj);
    PyBuffer_Release(&ci);
    PyBuffer_Release(&bits);
    Py_RETURN_NONE;

fail:
    if (coef.buf)
        PyBuffer_Release(&coef);
fail_coef:
    if (ent.buf)
        PyBuffer_Release(&ent);
fail_ent:
    PyBuffer_Release(&ratio);
fail_ratio:
    PyBuffer_Release(&fit);
fail_fit:
    PyBuffer_Release(&cj);
fail_cj:
    PyBuffer_Release(&ci);
fail_ci:
    PyBuffer_Release(&bits);
    return NULL;
}

static PyMethodDef methods[] = {
    {"row_stats", row_stats, METH_VARARGS, row_stats_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowstats",
    "Compiled sorted-row statistics for attndrift.probes.metrics (optional).", -1, methods,
};

PyMODINIT_FUNC
PyInit__rowstats(void)
{
    return PyModule_Create(&module);
}
