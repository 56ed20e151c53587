package dbconn

import "testing"

func TestRedactDSN(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"postgres://u:pw@h/db", "postgres://u:xxxxx@h/db"},
		{"postgresql://u:p%40ss@h:5432/db?sslmode=disable", "postgresql://u:xxxxx@h:5432/db?sslmode=disable"},
		{"postgres://u@h/db", "postgres://u@h/db"},
		{"postgres://h/db", "postgres://h/db"},
		{"postgres://u:p@ss@h/db", "postgres://u:xxxxx@h/db"},
		{"postgres://u:pa/ss@h/db", "postgres://u:xxxxx@h/db"},
		{"postgres://h/db?password=pw&sslmode=require", "postgres://h/db?password=xxxxx&sslmode=require"},
		{"postgres://h/db?application_name=me@x&sslpassword=pw", "postgres://h/db?application_name=me@x&sslpassword=xxxxx"},
		{"postgres://u:s3cret@host:notaport/db", "postgres://u:xxxxx@host:notaport/db"},
		{"host=h user=u password=pw dbname=d", "host=h user=u password=xxxxx dbname=d"},
		{"host=h password = pw dbname=d", "host=h password = xxxxx dbname=d"},
		{"host=h password='p w \\' x' dbname=d", "host=h password=xxxxx dbname=d"},
		{"host=h PASSWORD=pw", "host=h PASSWORD=xxxxx"},
		{"host=h sslpassword=pw", "host=h sslpassword=xxxxx"},
		{"host=h password='unterminated dbname=d", "host=h password=xxxxx"},
		{"host=h user=u", "host=h user=u"},
		{"", ""},
	} {
		if got := RedactDSN(tc.in); got != tc.want {
			t.Errorf("RedactDSN(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
