//! Page bookkeeping of the streaming reconstruction: which byte ranges of each input have been
//! read, and which whole pages of them have been released.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::MappedSnapshot;

/// Granularity of input page release.
const PAGE: usize = 4096;

/// Disjoint half-open byte ranges, merged as they are added.
#[derive(Default)]
struct Intervals(BTreeMap<usize, usize>);

impl Intervals {
    /// Adds `[a, b)` and returns the merged range that now contains it.
    fn insert(&mut self, mut a: usize, mut b: usize) -> (usize, usize) {
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e >= a {
                self.0.remove(&s);
                a = s;
                b = b.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..=b).next() {
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
        (a, b)
    }

    /// The range that contains `a` (which must have been inserted).
    fn containing(&self, a: usize) -> (usize, usize) {
        let (&s, &e) = self
            .0
            .range(..=a)
            .next_back()
            .expect("an inserted position");
        (s, e)
    }

    /// The parts of `[a, b)` not covered.
    fn gaps(&self, a: usize, b: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if a >= b {
            return out;
        }
        let mut at = a;
        let first = self.0.range(..=a).next_back().map(|(&s, &e)| (s, e));
        for (s, e) in first
            .into_iter()
            .chain(self.0.range(a + 1..b).map(|(&s, &e)| (s, e)))
        {
            if s > at {
                out.push((at, s.min(b)));
            }
            at = at.max(e);
            if at >= b {
                break;
            }
        }
        if at < b {
            out.push((at, b));
        }
        out
    }
}

/// One input of a streaming pass: the byte ranges read so far, and the part of them already
/// released.
#[derive(Default)]
pub(super) struct InputPages {
    read: Intervals,
    released: Intervals,
}

impl InputPages {
    /// Records that `ranges` (absolute byte ranges of `snap`) have been read and will not be
    /// read again, and releases the whole pages this newly covers.
    pub(super) fn release_read(&mut self, snap: &MappedSnapshot, ranges: &[(usize, usize)]) {
        for &(a, b) in ranges {
            self.read.insert(a, b);
        }
        // The merged ranges that grew; release what they newly cover in whole pages.
        let grown: BTreeSet<(usize, usize)> = ranges
            .iter()
            .map(|&(a, _)| self.read.containing(a))
            .collect();
        for (a, b) in grown {
            let (a, b) = (a.div_ceil(PAGE) * PAGE, b / PAGE * PAGE);
            for (x, y) in self.released.gaps(a, b) {
                snap.release(x, y);
            }
            if b > a {
                self.released.insert(a, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_merge_and_report_gaps() {
        let mut s = Intervals::default();
        assert_eq!(s.insert(10, 20), (10, 20));
        assert_eq!(s.insert(30, 40), (30, 40));
        assert_eq!(s.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(s.gaps(12, 18), vec![]);
        assert_eq!(s.gaps(15, 35), vec![(20, 30)]);
        assert_eq!(s.insert(20, 30), (10, 40)); // touching ranges merge
        assert_eq!(s.containing(25), (10, 40));
        assert_eq!(s.0.len(), 1);
        assert_eq!(s.insert(5, 45), (5, 45));
        assert_eq!(s.insert(50, 60), (50, 60));
        assert_eq!(s.gaps(0, 70), vec![(0, 5), (45, 50), (60, 70)]);
        assert_eq!(s.gaps(7, 7), vec![]);
        assert_eq!(s.gaps(9, 3), vec![]);
    }
}
