//! The invitation email: subject with the job title, a text/plain part with the link on
//! a line of its own and the duration, and an HTML alternative.

use email_encoding::headers::{rfc2047, writer::EmailWriter};
use lettre::{
    Address, Message,
    message::{
        Mailbox, MultiPart,
        header::{HeaderName, HeaderValue},
    },
};

/// Everything one invitation email says. Built fresh for every attempt from stored
/// state, so every attempt for an item carries the same link and Message-ID.
pub(crate) struct InviteEmail<'a> {
    pub(crate) to: &'a Address,
    pub(crate) to_name: Option<&'a str>,
    pub(crate) job_title: &'a str,
    pub(crate) duration_minutes: i32,
    pub(crate) link: &'a str,
    pub(crate) ttl_hours: u32,
    /// Without angle brackets: `{item id}@{sender's domain}`.
    pub(crate) message_id: &'a str,
}

/// The Message-ID of an item: unique per item, identical on every attempt.
pub(crate) fn message_id(item_id: uuid::Uuid, from: &Mailbox) -> String {
    format!("{item_id}@{}", from.email.domain())
}

/// Drops control characters (CR, LF, …) so a name or title can never start a new
/// header line; lettre encodes whatever remains.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The Subject header, read back by any mail client as exactly `subject`. lettre
/// writes a word of plain ASCII as it is, so a job title holding encoded-word syntax
/// (`=?utf-8?b?…?=`) would reach the client as an encoding to decode, showing text
/// nobody wrote. Such a subject is written whole as encoded words; any other goes the
/// usual way (plain ASCII as is, the rest encoded).
fn subject_header(subject: &str) -> HeaderValue {
    let name = HeaderName::new_from_ascii_str("Subject");
    if !subject.contains("=?") {
        return HeaderValue::new(name, subject.to_owned());
    }
    let mut encoded = String::new();
    let written = {
        let mut writer = EmailWriter::new(&mut encoded, "Subject: ".len(), 0, false);
        rfc2047::encode(subject, &mut writer)
    };
    match written {
        Ok(()) => HeaderValue::dangerous_new_pre_encoded(name, subject.to_owned(), encoded),
        Err(_) => HeaderValue::new(name, subject.to_owned()),
    }
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn expiry_phrase(ttl_hours: u32) -> String {
    if ttl_hours.is_multiple_of(24) {
        let days = ttl_hours / 24;
        format!("{days} day{}", if days == 1 { "" } else { "s" })
    } else {
        format!("{ttl_hours} hour{}", if ttl_hours == 1 { "" } else { "s" })
    }
}

impl InviteEmail<'_> {
    pub(crate) fn subject(&self) -> String {
        format!("Interview invitation: {}", one_line(self.job_title))
    }

    pub(crate) fn text(&self) -> String {
        let greeting = match self.to_name.map(one_line).filter(|n| !n.is_empty()) {
            Some(name) => format!("Hello {name},"),
            None => "Hello,".to_owned(),
        };
        // Lines stay under 76 characters so plain ASCII goes out as 7bit, readable as is.
        format!(
            "{greeting}\r\n\r\n\
             You are invited to a {minutes}-minute interview for the position of\r\n\
             {title}.\r\n\r\n\
             Start your interview whenever you are ready with your personal link:\r\n\r\n\
             {link}\r\n\r\n\
             The link is yours alone and works once.\r\n\
             It expires {expiry} after this email was sent.\r\n\
             Interview duration: {minutes} minutes.\r\n",
            minutes = self.duration_minutes,
            title = one_line(self.job_title),
            link = self.link,
            expiry = expiry_phrase(self.ttl_hours),
        )
    }

    pub(crate) fn html(&self) -> String {
        let greeting = match self.to_name.map(one_line).filter(|n| !n.is_empty()) {
            Some(name) => format!("Hello {},", html_escape(&name)),
            None => "Hello,".to_owned(),
        };
        let link = html_escape(self.link);
        format!(
            "<!doctype html><html><body>\
             <p>{greeting}</p>\
             <p>You are invited to a {minutes}-minute interview for the position of <strong>{title}</strong>.</p>\
             <p><a href=\"{link}\">Start your interview</a></p>\
             <p>The link is yours alone, works once, and expires {expiry} after this email was sent.</p>\
             </body></html>",
            minutes = self.duration_minutes,
            title = html_escape(&one_line(self.job_title)),
            expiry = expiry_phrase(self.ttl_hours),
        )
    }

    /// The message as lettre sends it.
    pub(crate) fn build(&self, from: &Mailbox) -> Result<Message, lettre::error::Error> {
        let name = self.to_name.map(one_line).filter(|n| !n.is_empty());
        Message::builder()
            .from(from.clone())
            .to(Mailbox::new(name, self.to.clone()))
            .raw_header(subject_header(&self.subject()))
            .message_id(Some(format!("<{}>", self.message_id)))
            .multipart(MultiPart::alternative_plain_html(self.text(), self.html()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email<'a>(to: &'a Address, name: Option<&'a str>, title: &'a str) -> InviteEmail<'a> {
        InviteEmail {
            to,
            to_name: name,
            job_title: title,
            duration_minutes: 30,
            link: "http://127.0.0.1:8080/i/abc",
            ttl_hours: 168,
            message_id: "id-1@example.com",
        }
    }

    #[test]
    fn the_text_part_has_the_link_on_its_own_line_and_the_duration() {
        let to: Address = "ada@example.com".parse().expect("address");
        let e = email(&to, Some("Ada"), "Backend Engineer");
        let text = e.text();
        assert!(
            text.lines()
                .any(|l| l.trim() == "http://127.0.0.1:8080/i/abc")
        );
        assert!(text.contains("30 minutes"));
        assert!(e.subject().contains("Backend Engineer"));
    }

    #[test]
    fn line_breaks_in_names_and_titles_cannot_add_headers() {
        let to: Address = "ada@example.com".parse().expect("address");
        let from: Mailbox = "Interviews <interviews@example.com>".parse().expect("from");
        let e = email(
            &to,
            Some("Ada\r\nBcc: evil@example.com"),
            "Job\r\nBcc: evil@example.com",
        );
        let raw = String::from_utf8(e.build(&from).expect("builds").formatted()).expect("utf8");
        let headers = raw.split("\r\n\r\n").next().unwrap_or_default();
        assert!(
            !headers
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
            "{headers}"
        );
    }

    /// The Subject as an independent reader decodes it: Python's `email` package.
    fn subject_as_read(raw: &[u8]) -> String {
        use std::io::Write;
        let mut python = std::process::Command::new("python3")
            .args([
                "-c",
                "import email, email.policy, sys; \
                 m = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default); \
                 sys.stdout.write(str(m['Subject']))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        python
            .stdin
            .take()
            .expect("stdin")
            .write_all(raw)
            .expect("writes");
        let out = python.wait_with_output().expect("python3 answers");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8")
    }

    #[test]
    fn a_title_with_encoded_word_syntax_or_control_characters_reads_back_as_its_text() {
        let to: Address = "ada@example.com".parse().expect("address");
        let from: Mailbox = "Interviews <interviews@example.com>".parse().expect("from");
        for (title, shown) in [
            ("=?utf-8?b?SGFja2Vk?=", "=?utf-8?b?SGFja2Vk?="),
            (
                "Data =?ISO-8859-1?Q?Engin=E9er?= (remote)",
                "Data =?ISO-8859-1?Q?Engin=E9er?= (remote)",
            ),
            (
                "Back\u{0}end\r\nBcc: x@example.com",
                "Back end  Bcc: x@example.com",
            ),
            ("Ingénieure données", "Ingénieure données"),
            ("Backend Engineer", "Backend Engineer"),
        ] {
            let raw = email(&to, None, title)
                .build(&from)
                .expect("builds")
                .formatted();
            assert_eq!(
                subject_as_read(&raw),
                format!("Interview invitation: {shown}"),
                "{title:?}"
            );
        }
    }

    #[test]
    fn html_in_names_is_escaped_in_the_html_part() {
        let to: Address = "ada@example.com".parse().expect("address");
        let e = email(&to, Some("<script>x</script>"), "A & B");
        assert!(e.html().contains("&lt;script&gt;"));
        assert!(e.html().contains("A &amp; B"));
    }
}
