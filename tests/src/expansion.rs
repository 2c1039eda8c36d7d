//! The kubelet's `$(VAR)` expansion in a container's command, args and env values
//! (Kubernetes `third_party/forked/golang/expansion`): `$(NAME)` becomes the variable's
//! value when it is defined and stays as written when it is not; `$$` is an escaped `$`;
//! any other `$` is kept.

/// `input` with every `$(NAME)` that `lookup` knows replaced by its value.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut copied = 0;
    let mut cursor = 0;
    while cursor + 1 < bytes.len() {
        if bytes[cursor] != b'$' {
            cursor += 1;
            continue;
        }
        out.push_str(&input[copied..cursor]);
        match bytes[cursor + 1] {
            b'$' => {
                out.push('$');
                cursor += 2;
            }
            b'(' => match input[cursor + 2..].find(')') {
                Some(length) => {
                    let name = &input[cursor + 2..cursor + 2 + length];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => out.push_str(&format!("$({name})")),
                    }
                    cursor += 3 + length;
                }
                // Not closed: kept as written.
                None => {
                    out.push_str("$(");
                    cursor += 2;
                }
            },
            // Not a reference: the `$` is kept, and what follows is copied as usual.
            _ => {
                out.push('$');
                cursor += 1;
            }
        }
        copied = cursor;
    }
    out.push_str(&input[copied..]);
    out
}

/// The names `$(...)` references in `input` (defined or not), in order.
pub fn references(input: &str) -> Vec<String> {
    let names = std::cell::RefCell::new(Vec::new());
    expand(input, |name| {
        names.borrow_mut().push(name.to_owned());
        None
    });
    names.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST_IP" => Some("198.18.0.1".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn defined_references_are_replaced_and_undefined_ones_kept() {
        assert_eq!(
            expand("--metrics-addr=$(HOST_IP):15090", env),
            "--metrics-addr=198.18.0.1:15090"
        );
        assert_eq!(expand("$(HOST_IP)$(HOST_IP)", env), "198.18.0.1198.18.0.1");
        assert_eq!(expand("a$(EMPTY)b", env), "ab");
        assert_eq!(expand("$(UNDEFINED):1", env), "$(UNDEFINED):1");
        assert_eq!(expand("no references", env), "no references");
    }

    #[test]
    fn escapes_and_stray_operators_are_read_as_the_kubelet_reads_them() {
        assert_eq!(expand("$$(HOST_IP)", env), "$(HOST_IP)");
        assert_eq!(expand("$$$(HOST_IP)", env), "$198.18.0.1");
        assert_eq!(expand("cost: $5", env), "cost: $5");
        assert_eq!(expand("trailing $", env), "trailing $");
        assert_eq!(expand("$(HOST_IP", env), "$(HOST_IP");
        assert_eq!(expand("$a$(HOST_IP)", env), "$a198.18.0.1");
        assert_eq!(expand("é$(HOST_IP)é", env), "é198.18.0.1é");
    }

    #[test]
    fn references_lists_every_name_but_not_escaped_ones() {
        assert_eq!(
            references("$(A):$(B) $$(C) $(A"),
            vec!["A".to_owned(), "B".to_owned()]
        );
    }
}
