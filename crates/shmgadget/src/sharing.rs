//! Who may use a domain's or a section's objects, said without POSIX: [`Sharing`].

/// Who may open and map an object shmgadget creates (a registry, a section): its owner only,
/// its owner's group, or every user. Platform-neutral: on Linux it becomes the object's
/// permission bits (owner-only `0o600`, group `0o660`, everyone `0o666`); another platform
/// maps the same three classes to its own access control.
///
/// [`Sharing::from_posix_mode`] accepts any POSIX mode (the CLI's `--mode`), validated when the
/// object is created: bits outside `0o777` are refused there with `InvalidArgument`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sharing(u32);

impl Sharing {
    /// Only the creating user (`0o600`). The default.
    pub const fn owner_only() -> Sharing {
        Sharing(0o600)
    }

    /// The creating user and its group (`0o660`).
    pub const fn group() -> Sharing {
        Sharing(0o660)
    }

    /// Every user of the machine (`0o666`).
    pub const fn everyone() -> Sharing {
        Sharing(0o666)
    }

    /// Exactly the POSIX permission bits `mode` (for example `0o640`: the group may read).
    pub const fn from_posix_mode(mode: u32) -> Sharing {
        Sharing(mode)
    }

    /// The POSIX permission bits this stands for.
    pub const fn posix_mode(self) -> u32 {
        self.0
    }
}

impl Default for Sharing {
    fn default() -> Sharing {
        Sharing::owner_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_classes_are_the_usual_posix_modes() {
        assert_eq!(Sharing::default(), Sharing::owner_only());
        assert_eq!(Sharing::owner_only().posix_mode(), 0o600);
        assert_eq!(Sharing::group().posix_mode(), 0o660);
        assert_eq!(Sharing::everyone().posix_mode(), 0o666);
        assert_eq!(Sharing::from_posix_mode(0o640).posix_mode(), 0o640);
    }
}
