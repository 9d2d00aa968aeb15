//! The CPU features sites dispatch on, and a small set type for them.
//!
//! Canonical names are Rust identifiers (`sse4_2`, `avx512f`) so they can be written bare in macro
//! predicates; the spellings people know from `/proc/cpuinfo` and `is_x86_feature_detected!`
//! (`sse4.2`, `abm`, `sha_ni`, `ermsb`) are accepted as aliases.

use core::fmt;

macro_rules! features {
    ($($variant:ident = $name:literal $(| $alias:literal)*),+ $(,)?) => {
        /// A CPU feature a candidate can require.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum Feature { $($variant),+ }

        impl Feature {
            /// Every feature, in declaration order.
            pub const ALL: &'static [Feature] = &[$(Feature::$variant),+];

            /// The canonical name (`"sse4_2"`, `"avx2"`).
            pub const fn name(self) -> &'static str {
                match self { $(Feature::$variant => $name),+ }
            }

            /// Looks a feature up by canonical name or alias, ASCII case-insensitively.
            pub fn from_name(name: &str) -> Option<Feature> {
                let name = name.trim();
                $(
                    if name.eq_ignore_ascii_case($name) $(|| name.eq_ignore_ascii_case($alias))* {
                        return Some(Feature::$variant);
                    }
                )+
                None
            }

            /// `from_name` usable in `const` items: macros call it so that an unknown feature name
            /// is a compile-time error rather than a silent non-match.
            pub const fn from_name_const(name: &str) -> Option<Feature> {
                $(
                    if const_eq(name, $name) $(|| const_eq(name, $alias))* {
                        return Some(Feature::$variant);
                    }
                )+
                None
            }
        }
    };
}

features! {
    Sse3 = "sse3",
    Ssse3 = "ssse3",
    Sse4_1 = "sse4_1" | "sse4.1",
    Sse4_2 = "sse4_2" | "sse4.2",
    Popcnt = "popcnt",
    Lzcnt = "lzcnt" | "abm",
    Bmi1 = "bmi1",
    Bmi2 = "bmi2",
    Avx = "avx",
    Avx2 = "avx2",
    Fma = "fma",
    F16c = "f16c",
    Avx512f = "avx512f",
    Avx512dq = "avx512dq",
    Avx512cd = "avx512cd",
    Avx512bw = "avx512bw",
    Avx512vl = "avx512vl",
    Erms = "erms" | "ermsb",
    Fsrm = "fsrm",
    Rdtscp = "rdtscp",
    Clflushopt = "clflushopt",
    Clwb = "clwb",
    Movbe = "movbe",
    Sha = "sha" | "sha_ni",
    Aes = "aes",
    Pclmulqdq = "pclmulqdq",
    Rdrand = "rdrand",
    Rdseed = "rdseed",
    Adx = "adx",
    Xsave = "xsave",
    Cmpxchg16b = "cmpxchg16b" | "cx16",
}

/// String equality in `const` context.
pub(crate) const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Feature`]s (a bitmask; every feature fits in one `u64`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet(u64);

impl FeatureSet {
    /// The empty set.
    pub const EMPTY: FeatureSet = FeatureSet(0);

    const fn bit(feature: Feature) -> u64 {
        1 << feature as u8
    }

    /// Whether `feature` is in the set.
    pub const fn contains(self, feature: Feature) -> bool {
        self.0 & Self::bit(feature) != 0
    }

    /// The set with `feature` added.
    #[must_use]
    pub const fn with(self, feature: Feature) -> FeatureSet {
        FeatureSet(self.0 | Self::bit(feature))
    }

    /// The set with `feature` removed.
    #[must_use]
    pub const fn without(self, feature: Feature) -> FeatureSet {
        FeatureSet(self.0 & !Self::bit(feature))
    }

    /// The features in `self` that are not in `other`.
    #[must_use]
    pub const fn difference(self, other: FeatureSet) -> FeatureSet {
        FeatureSet(self.0 & !other.0)
    }

    /// Adds `feature` in place.
    pub fn insert(&mut self, feature: Feature) {
        *self = self.with(feature);
    }

    /// Removes `feature` in place.
    pub fn remove(&mut self, feature: Feature) {
        *self = self.without(feature);
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The features in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL
            .iter()
            .copied()
            .filter(move |f| self.contains(*f))
    }
}

impl FromIterator<Feature> for FeatureSet {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Self {
        iter.into_iter().fold(FeatureSet::EMPTY, FeatureSet::with)
    }
}

impl fmt::Debug for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, feature) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(feature.name())?;
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Feature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A list of feature names.
#[cfg(feature = "serde")]
impl serde::Serialize for FeatureSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_round_trips_through_its_name() {
        assert!(Feature::ALL.len() <= 64);
        for &f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
            assert_eq!(Feature::from_name_const(f.name()), Some(f));
        }
    }

    #[test]
    fn aliases_and_case_are_accepted() {
        assert_eq!(Feature::from_name("sse4.2"), Some(Feature::Sse4_2));
        assert_eq!(Feature::from_name("ABM"), Some(Feature::Lzcnt));
        assert_eq!(Feature::from_name("sha_ni"), Some(Feature::Sha));
        assert_eq!(Feature::from_name("avx3"), None);
    }

    #[test]
    fn set_operations() {
        let s: FeatureSet = [Feature::Avx2, Feature::Popcnt].into_iter().collect();
        assert!(s.contains(Feature::Avx2) && !s.contains(Feature::Avx));
        assert_eq!(
            s.without(Feature::Avx2).iter().collect::<Vec<_>>(),
            [Feature::Popcnt]
        );
        assert_eq!(s.to_string(), "popcnt avx2");
    }
}
