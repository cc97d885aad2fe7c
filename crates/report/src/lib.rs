//! How equally compute is shared across people: the Gini coefficient, the Lorenz curve, the
//! shares of the top 1 % and 10 %, the median. Pure functions of counts (each person's compute
//! used, in cu), with no I/O and no knowledge of where the counts came from; the operator's page
//! shows them exactly. [`transparency`] publishes them for everyone with differential-privacy
//! noise drawn by [`noise`].

pub mod noise;
pub mod transparency;

/// The points of the Lorenz curve: the poorest 0 %, 10 %, …, 100 % of people.
pub const LORENZ_POINTS: usize = 11;

/// How one period's compute was spread across people.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    /// People counted (everyone with a stipend, whether they used any or not).
    pub people: u64,
    /// People who used any compute.
    pub people_active: u64,
    /// Compute used by them all, in cu.
    pub used_cu: u128,
    /// The Gini coefficient of compute used: 0 when all used the same, towards 1 when one used
    /// it all. 0 when nobody used anything.
    pub gini: f64,
    /// The share of all compute used by the poorest 0 %, 10 %, …, 100 % of people (people split
    /// at a boundary count by the fraction inside it). A straight line when nobody used anything.
    pub lorenz: [f64; LORENZ_POINTS],
    /// The share used by the top 1 % of people.
    pub top_1pct_share: f64,
    /// The share used by the top 10 % of people.
    pub top_10pct_share: f64,
    /// The median person's compute used, in cu (the mean of the middle two for an even count).
    pub median_cu: f64,
}

impl Distribution {
    /// The distribution of `used_cu`, one entry per person, in any order (they are sorted here).
    pub fn of(mut used_cu: Vec<u64>) -> Distribution {
        used_cu.sort_unstable();
        let people = used_cu.len() as u64;
        let total: u128 = used_cu.iter().map(|&used| u128::from(used)).sum();
        let people_active = used_cu.iter().filter(|&&used| used > 0).count() as u64;
        let mut lorenz = [0.0; LORENZ_POINTS];
        for (index, point) in lorenz.iter_mut().enumerate() {
            *point = lorenz_at(&used_cu, total, index as f64 / (LORENZ_POINTS - 1) as f64);
        }
        Distribution {
            people,
            people_active,
            used_cu: total,
            gini: gini(&used_cu, total),
            lorenz,
            top_1pct_share: 1.0 - lorenz_at(&used_cu, total, 0.99),
            top_10pct_share: 1.0 - lorenz_at(&used_cu, total, 0.90),
            median_cu: median(&used_cu),
        }
    }
}

/// The Gini coefficient of sorted values: the mean absolute difference between two people over
/// twice the mean, in its closed form over ranks, (2 Σ i·xᵢ) / (n Σ xᵢ) − (n + 1) / n with i
/// from 1. Sums are exact integers; only the last division is floating point.
fn gini(sorted: &[u64], total: u128) -> f64 {
    let n = sorted.len() as u128;
    if n == 0 || total == 0 {
        return 0.0;
    }
    let ranked: u128 = sorted
        .iter()
        .enumerate()
        .map(|(index, &used)| (index as u128 + 1) * u128::from(used))
        .sum();
    let numerator = 2 * ranked - (n + 1) * total;
    numerator as f64 / (n * total) as f64
}

/// The share of `total` held by the poorest fraction `p` of the sorted values; the person
/// straddling the boundary counts by the part of them inside it.
fn lorenz_at(sorted: &[u64], total: u128, p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 || total == 0 {
        return p;
    }
    let people = p * n as f64;
    let whole = (people.floor() as usize).min(n);
    let mut held: u128 = sorted[..whole].iter().map(|&used| u128::from(used)).sum();
    let mut share = 0.0;
    if whole < n {
        let part = people - whole as f64;
        share = part * sorted[whole] as f64;
    } else {
        held = total;
    }
    ((held as f64 + share) / total as f64).clamp(0.0, 1.0)
}

fn median(sorted: &[u64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2] as f64,
        n => (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn everyone_equal_is_zero() {
        let d = Distribution::of(vec![7; 100]);
        assert!(close(d.gini, 0.0));
        for (index, point) in d.lorenz.iter().enumerate() {
            assert!(close(*point, index as f64 / 10.0), "{:?}", d.lorenz);
        }
        assert!(close(d.top_10pct_share, 0.1));
        assert!(close(d.top_1pct_share, 0.01));
        assert!(close(d.median_cu, 7.0));
        assert_eq!((d.people, d.people_active, d.used_cu), (100, 100, 700));
    }

    #[test]
    fn one_person_using_everything_is_as_unequal_as_n_allows() {
        // With n people and one holding all, G = (n − 1) / n.
        let mut used = vec![0; 99];
        used.push(1_000);
        let d = Distribution::of(used);
        assert!(close(d.gini, 0.99), "{}", d.gini);
        assert!(close(d.lorenz[9], 0.0));
        assert!(close(d.lorenz[10], 1.0));
        assert!(close(d.top_1pct_share, 1.0));
        assert!(close(d.median_cu, 0.0));
        assert_eq!(d.people_active, 1);
    }

    #[test]
    fn a_known_distribution() {
        // 1, 2, 3, 4: mean absolute difference over all ordered pairs is 20/16 = 1.25, mean 2.5,
        // so G = 1.25 / (2 × 2.5) = 0.25.
        let d = Distribution::of(vec![4, 1, 3, 2]);
        assert!(close(d.gini, 0.25), "{}", d.gini);
        // The poorest half holds 1 + 2 of 10.
        assert!(close(d.lorenz[5], 0.3), "{:?}", d.lorenz);
        // The poorest 10 % is 0.4 of the poorest person: 0.4 of 1, of 10.
        assert!(close(d.lorenz[1], 0.04), "{:?}", d.lorenz);
        assert!(close(d.median_cu, 2.5));
    }

    #[test]
    fn nobody_used_anything() {
        let d = Distribution::of(vec![0; 5]);
        assert!(close(d.gini, 0.0));
        assert!(close(d.lorenz[3], 0.3));
        assert!(close(d.median_cu, 0.0));
        let empty = Distribution::of(Vec::new());
        assert_eq!(empty.people, 0);
        assert!(close(empty.gini, 0.0));
    }

    /// The Gini coefficient by its definition: Σᵢ Σⱼ |xᵢ − xⱼ| / (2 n² mean).
    fn gini_by_pairs(used: &[u64]) -> f64 {
        let n = used.len() as f64;
        let total: f64 = used.iter().map(|&x| x as f64).sum();
        if total == 0.0 {
            return 0.0;
        }
        let mut sum = 0.0;
        for &a in used {
            for &b in used {
                sum += (a as f64 - b as f64).abs();
            }
        }
        sum / (2.0 * n * total)
    }

    proptest! {
        #[test]
        fn agrees_with_the_definition(used in prop::collection::vec(0u64..1_000_000, 1..60)) {
            let d = Distribution::of(used.clone());
            prop_assert!((d.gini - gini_by_pairs(&used)).abs() < 1e-9);
            prop_assert!((0.0..=1.0).contains(&d.gini));
            // The curve rises from 0 to 1 and stays under the line of equality.
            prop_assert!(close(d.lorenz[0], 0.0));
            prop_assert!(close(d.lorenz[10], 1.0));
            for index in 1..LORENZ_POINTS {
                prop_assert!(d.lorenz[index] >= d.lorenz[index - 1] - 1e-12);
                prop_assert!(d.lorenz[index] <= index as f64 / 10.0 + 1e-12);
            }
            prop_assert!(d.top_1pct_share <= d.top_10pct_share + 1e-12);
            prop_assert!(d.top_10pct_share >= 0.1 - 1e-12 || d.used_cu == 0);
        }
    }
}
