//! The CEL subset Dapr routing rules need: `event.<field>[.<field>…] == <literal>` and `!=`,
//! combined with `&&`, `||` and parentheses. Literals: strings ('…' or "…"), numbers, booleans.
//! Compiled once per subscription; evaluated per message against the CloudEvent.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp {
        path: Vec<String>,
        eq: bool,
        value: Value,
    },
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Lit(Value),
    Eq,
    Ne,
    And,
    Or,
    LParen,
    RParen,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = vec![];
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        match ch {
            ' ' | '\t' | '\n' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            '=' | '!' | '&' | '|' => {
                let two: String = c[i..(i + 2).min(c.len())].iter().collect();
                out.push(match two.as_str() {
                    "==" => Tok::Eq,
                    "!=" => Tok::Ne,
                    "&&" => Tok::And,
                    "||" => Tok::Or,
                    _ => return Err(format!("unexpected \"{two}\" at {i}")),
                });
                i += 2;
            }
            '"' | '\'' => {
                let mut j = i + 1;
                let mut s = String::new();
                while j < c.len() && c[j] != ch {
                    if c[j] == '\\' && j + 1 < c.len() {
                        j += 1;
                    }
                    s.push(c[j]);
                    j += 1;
                }
                if j >= c.len() {
                    return Err("unterminated string".into());
                }
                out.push(Tok::Lit(Value::String(s)));
                i = j + 1;
            }
            _ if ch.is_ascii_digit() || ch == '-' => {
                let mut j = i + 1;
                while j < c.len() && (c[j].is_ascii_digit() || c[j] == '.') {
                    j += 1;
                }
                let t: String = c[i..j].iter().collect();
                let v: Value =
                    serde_json::from_str(&t).map_err(|_| format!("invalid number \"{t}\""))?;
                out.push(Tok::Lit(v));
                i = j;
            }
            _ if ch.is_alphabetic() || ch == '_' => {
                let mut j = i + 1;
                while j < c.len() && (c[j].is_alphanumeric() || c[j] == '_' || c[j] == '.') {
                    j += 1;
                }
                let t: String = c[i..j].iter().collect();
                out.push(match t.as_str() {
                    "true" => Tok::Lit(Value::Bool(true)),
                    "false" => Tok::Lit(Value::Bool(false)),
                    _ => Tok::Ident(t),
                });
                i = j;
            }
            _ => return Err(format!("unexpected character '{ch}'")),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.atom()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            l = Expr::And(Box::new(l), Box::new(self.atom()?));
        }
        Ok(l)
    }
    fn atom(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.or()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Tok::Ident(id)) => {
                let mut parts = id.split('.').map(str::to_string);
                if parts.next().as_deref() != Some("event") {
                    return Err(format!("\"{id}\": only event.<field> can be matched"));
                }
                let path: Vec<String> = parts.collect();
                let eq = match self.next() {
                    Some(Tok::Eq) => true,
                    Some(Tok::Ne) => false,
                    _ => return Err(format!("expected == or != after {id}")),
                };
                match self.next() {
                    Some(Tok::Lit(value)) => Ok(Expr::Cmp { path, eq, value }),
                    _ => Err(format!("expected a literal after {id}")),
                }
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

impl Expr {
    pub fn parse(s: &str) -> Result<Expr, String> {
        let mut p = Parser {
            toks: lex(s)?,
            pos: 0,
        };
        let e = p.or()?;
        if p.pos != p.toks.len() {
            return Err("unexpected tokens after the expression".into());
        }
        Ok(e)
    }

    pub fn eval(&self, event: &Value) -> bool {
        match self {
            Expr::Cmp { path, eq, value } => {
                let mut cur = event;
                for p in path {
                    match cur.get(p) {
                        Some(v) => cur = v,
                        None => return !*eq,
                    }
                }
                (cur == value) == *eq
            }
            Expr::And(a, b) => a.eval(event) && b.eval(event),
            Expr::Or(a, b) => a.eval(event) || b.eval(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_event_fields() {
        let ev = json!({"type": "widget", "data": {"n": 3, "ok": true}});
        assert!(Expr::parse(r#"event.type == "widget""#).unwrap().eval(&ev));
        assert!(!Expr::parse("event.type == 'gadget'").unwrap().eval(&ev));
        assert!(Expr::parse("event.type != 'gadget' && event.data.n == 3")
            .unwrap()
            .eval(&ev));
        assert!(Expr::parse("(event.type == 'x' || event.data.ok == true)")
            .unwrap()
            .eval(&ev));
        assert!(Expr::parse("event.type = 'x'").is_err());
        assert!(Expr::parse("foo.type == 'x'").is_err());
    }
}
