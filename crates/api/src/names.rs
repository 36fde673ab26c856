//! `named_enum!`: enums whose values have fixed names.

/// Declares a fieldless enum whose variants each have a name, with `as_str` and
/// `Display` from one list. With `: "kind"` after the enum's name it also gets `ALL`
/// (every variant, in declaration order) and a `FromStr` that fails with
/// [`UnknownValue`](crate::domain::UnknownValue) naming `kind`.
///
/// ```text
/// named_enum! {
///     /// A colour.
///     #[derive(Debug, Clone, Copy, PartialEq, Eq)]
///     pub enum Colour: "colour" {
///         /// Red.
///         Red => "red",
///     }
/// }
/// ```
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $kind:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        named_enum! {
            $(#[$meta])*
            $vis enum $name { $($(#[$vmeta])* $variant => $text),+ }
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .into_iter()
                    .find(|value| value.as_str() == s)
                    .ok_or_else(|| $crate::domain::UnknownValue {
                        kind: $kind,
                        value: s.to_owned(),
                    })
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// This value's name.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::domain::{AirlockRequestStatus, ResourceType, Status};

    /// Ensures that every status, resource type and airlock request status is written
    /// as its TRE name and read back from it, and that other names are refused.
    #[test]
    fn statuses_and_resource_types_use_tre_names() {
        assert_names_round_trip(&Status::ALL);
        assert!("pipeline_failed".parse::<Status>().is_err());
        assert!(serde_json::from_str::<Status>("\"pipeline_succeeded\"").is_err());
        assert_names_round_trip(&ResourceType::ALL);
        assert!("workspace_service".parse::<ResourceType>().is_err());
        assert_names_round_trip(&AirlockRequestStatus::ALL);
    }

    /// Asserts that each of `all` is written to JSON as its name, and read back from its
    /// JSON and from its name.
    fn assert_names_round_trip<T>(all: &[T])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr,
        T: serde::Serialize + serde::de::DeserializeOwned,
        T::Err: std::fmt::Debug,
    {
        for &value in all {
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(json, format!("\"{value}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), value);
            assert_eq!(value.to_string().parse::<T>().unwrap(), value);
        }
    }
}
