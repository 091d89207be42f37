//! What amalgam knows of an sd-mecha method, declared once per method (in [`METHODS`]): its
//! keyword parameters in sd-mecha's signature order (with sd-mecha's defaults where amalgam
//! needs them), the merge spaces of its inputs and result, and how it becomes amalgam's graph.
//! The list of supported methods, the parameter and merge-space checks ([`super::check`]), the
//! translation and the one-node export ([`super::direct`]) all read it.

use super::check::Spaces;
pub(super) use super::table::METHODS;
use super::translate::{Item, Merge, State};
use crate::error::Result;

/// One sd-mecha method.
#[derive(Debug)]
pub(super) struct Mecha {
    /// Its name in `.mecha` files.
    pub(super) name: &'static str,
    /// Its keyword parameters, in signature order (they may be given by position after the
    /// inputs).
    pub(super) params: &'static [Param],
    /// Its merge spaces.
    pub(super) spaces: Spaces,
    /// How it becomes amalgam's graph.
    pub(super) translation: Translation,
}

/// One keyword parameter of an sd-mecha method.
#[derive(Clone, Copy, Debug)]
pub(super) struct Param {
    /// Its name.
    pub(super) name: &'static str,
    /// sd-mecha's default, where a recipe leaving it out needs one.
    pub(super) default: Option<Scalar>,
    /// What amalgam does with it.
    pub(super) map: Map,
}

/// An sd-mecha default.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Scalar {
    /// A number.
    Number(f64),
    /// A bool.
    Bool(bool),
}

impl Scalar {
    /// The value as a number (a bool is 0 or 1).
    pub(super) fn number(self) -> f64 {
        match self {
            Scalar::Number(x) => x,
            Scalar::Bool(b) => f64::from(u8::from(b)),
        }
    }
}

/// How one sd-mecha keyword parameter maps to amalgam.
#[derive(Clone, Copy, Debug)]
pub(super) enum Map {
    /// The same value under amalgam's name (a [`Translation::Direct`] method's parameter).
    To(&'static str),
    /// An sd-mecha bool choosing between two options of an amalgam choice (a
    /// [`Translation::Direct`] method's parameter); the parameter's default is sd-mecha's.
    Flag {
        /// The amalgam choice.
        to: &'static str,
        /// The option of `true`.
        yes: &'static str,
        /// The option of `false`.
        no: &'static str,
    },
    /// Read by the method's [`Translation::Special`].
    Read,
    /// Accepted and not used (see the method's docs for why).
    Unused,
}

/// What a merge line of one sd-mecha method becomes.
pub(super) type Special = fn(&mut State, &Merge) -> Result<Item>;

/// How an sd-mecha method becomes amalgam's graph.
#[derive(Debug)]
pub(super) enum Translation {
    /// One node of this amalgam method, with the same inputs in the same order, each keyword
    /// parameter mapped by its [`Map`] (read from and written to `.mecha`: [`super::direct`]).
    Direct(&'static str),
    /// Its own translation (read only).
    Special(Special),
}

/// The names of [`METHODS`], in order.
const NAMES: [&str; METHODS.len()] = {
    let mut names = [""; METHODS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = METHODS[i].name;
        i += 1;
    }
    names
};

/// The sd-mecha methods amalgam runs, as they appear in `.mecha` files.
pub const SUPPORTED: &[&str] = &NAMES;

/// The declaration of sd-mecha method `name`.
pub(super) fn by_name(name: &str) -> Option<&'static Mecha> {
    METHODS.iter().find(|m| m.name == name)
}

/// The sd-mecha method that is one node of amalgam method `method`.
pub(super) fn by_method(method: &str) -> Option<&'static Mecha> {
    METHODS
        .iter()
        .find(|m| matches!(m.translation, Translation::Direct(a) if a == method))
}

impl Mecha {
    /// The names of its keyword parameters, in order.
    pub(super) fn param_names(&self) -> impl Iterator<Item = &'static str> {
        self.params.iter().map(|p| p.name)
    }

    /// sd-mecha's default of parameter `name`, as a number (a bool is 0 or 1).
    pub(super) fn default(&self, name: &str) -> f64 {
        self.params
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.default)
            .unwrap_or_else(|| panic!("`{}` declares `{name}` with a default", self.name))
            .number()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::ParamKind;

    #[test]
    fn names_are_unique_and_none_is_refused() {
        for (i, m) in METHODS.iter().enumerate() {
            assert!(
                METHODS[..i].iter().all(|x| x.name != m.name),
                "{} twice",
                m.name
            );
            let params: Vec<_> = m.param_names().collect();
            for (j, p) in params.iter().enumerate() {
                assert!(!params[..j].contains(p), "{}: `{p}` twice", m.name);
            }
            // A method refused as a node may only be read as something else: `pick_component`
            // is the recipe's component routing.
            let refused = crate::methods::REFUSED.iter().any(|(n, _)| *n == m.name);
            assert_eq!(refused, m.name == "pick_component", "{} is refused", m.name);
        }
        assert_eq!(SUPPORTED.len(), METHODS.len());
        assert!(SUPPORTED.iter().all(|n| by_name(n).is_some()));
    }

    #[test]
    fn every_map_fits_its_method() {
        for m in METHODS {
            for p in m.params {
                let direct = match m.translation {
                    Translation::Direct(method) => method,
                    Translation::Special(_) => {
                        assert!(
                            matches!(p.map, Map::Read | Map::Unused),
                            "{}: a special translation's `{}` is mapped",
                            m.name,
                            p.name
                        );
                        continue;
                    }
                };
                let info = crate::methods::info(direct).unwrap();
                let declared = |to: &str| {
                    info.params
                        .iter()
                        .find(|x| x.name == to)
                        .unwrap_or_else(|| panic!("{}: `{direct}` has no `{to}`", m.name))
                };
                match p.map {
                    Map::To(to) => {
                        declared(to);
                    }
                    Map::Flag { to, yes, no } => {
                        let ParamKind::Choice { options, .. } = declared(to).kind else {
                            panic!("{}: `{direct}`'s `{to}` is not a choice", m.name);
                        };
                        assert!(
                            options.contains(&yes) && options.contains(&no),
                            "{}: `{yes}` or `{no}` is not an option of `{to}`",
                            m.name
                        );
                        assert!(
                            matches!(p.default, Some(Scalar::Bool(_))),
                            "{}: flag `{}` has no default",
                            m.name,
                            p.name
                        );
                    }
                    Map::Unused => {}
                    Map::Read => panic!("{}: direct `{}` is not mapped", m.name, p.name),
                }
            }
        }
    }
}
